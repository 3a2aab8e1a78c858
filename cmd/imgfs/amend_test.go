package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestAmendMatchesQemu runs amend with both tools on copies of the same
// image and requires the same output, exit code and resulting file,
// byte for byte, and a clean qemu-img check.
func TestAmendMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "v2.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2snap.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 64k", "v2snap.qcow2"),
		qimg("snapshot", "-c", "s1", "v2snap.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "v3.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -z 1M 64k", "-c", "write -P 3 2M 64k",
			"-c", "write -z 2M 64k", "-c", "write -P 4 5M 4k", "v3.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -P 9 0 4M", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"),
		qio("-f", "qcow2", "-c", "write -z 0 128k", "-c", "write -P 1 1M 64k", "-c", "write -z 1M 64k", "top.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "16M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 3M", "-c", "write -P 2 9M 1M", "small.qcow2"),
		qimg("snapshot", "-c", "s", "small.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy.qcow2", "64M"),
		qioCrash("-f", "qcow2", "-c", "write -P 1 0 1M", "lazy.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=8", "r8.qcow2", "64M"),
		qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "el.qcow2", "64M"),
		qimg("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "zstd.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -c -P 1 0 64k", "zstd.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "data_file=df.qcow2.data", "df.qcow2", "64M"),
		qimg("create", "-q", "-f", "raw", "r.raw", "1M"),
	})
	for _, tc := range []struct {
		orig string
		args []string
	}{
		{"v2.qcow2", []string{"-o", "compat=1.1"}},
		{"v2.qcow2", []string{"-p", "-o", "compat=v3,lazy_refcounts=on"}},
		{"v2.qcow2", []string{"-p", "-o", "compat=1.1,refcount_bits=1"}},
		{"v2.qcow2", []string{"-o", "compat=1.1,backing_file=x"}},
		{"v2.qcow2", []string{"-o", "lazy_refcounts=on"}},
		{"v2.qcow2", []string{"-o", "refcount_bits=8"}},
		{"v2snap.qcow2", []string{"-p", "-o", "compat=1.1"}},
		{"v3.qcow2", []string{"-p", "-o", "compat=0.10"}},
		{"v3.qcow2", []string{"-o", "lazy_refcounts=on"}},
		{"v3.qcow2", []string{"-o", "lazy_refcounts=off"}},
		{"v3.qcow2", []string{"-o", "size=128M"}},
		{"v3.qcow2", []string{"-o", "size=32M"}},
		{"v3.qcow2", []string{"-p", "-o", "refcount_bits=1"}},
		{"v3.qcow2", []string{"-o", "refcount_bits=64"}},
		{"v3.qcow2", []string{"-p", "-o", "refcount_bits=8,compat=0.10"}},
		{"v3.qcow2", []string{"-o", "refcount_bits=3"}},
		{"v3.qcow2", []string{"-o", "compat=2"}},
		{"v3.qcow2", []string{"-o", "cluster_size=4k"}},
		{"v3.qcow2", []string{"-o", "encrypt.keyslot=1,cluster_size=4k"}},
		{"v3.qcow2", []string{"-o", "encrypt.new-secret=x"}},
		{"v3.qcow2", []string{"-o", "bogus=1"}},
		{"v3.qcow2", []string{"-o", "data_file=x"}},
		{"v3.qcow2", []string{"-o", "data_file_raw=on"}},
		{"v3.qcow2", []string{"-o", "help"}},
		{"v3.qcow2", []string{"-t", "bogus", "-o", "compat=1.1"}},
		{"v3.qcow2", []string{}},
		{"top.qcow2", []string{"-p", "-o", "compat=0.10"}},
		{"small.qcow2", []string{"-p", "-o", "refcount_bits=64"}},
		{"small.qcow2", []string{"-o", "refcount_bits=2"}},
		{"small.qcow2", []string{"-o", "refcount_bits=1"}},
		{"lazy.qcow2", []string{"-o", "lazy_refcounts=off"}},
		{"lazy.qcow2", []string{"-o", "compat=0.10"}},
		{"r8.qcow2", []string{"-o", "compat=0.10"}},
		{"r8.qcow2", []string{"-o", "refcount_bits=16,compat=0.10"}},
		{"el.qcow2", []string{"-o", "compat=0.10"}},
		{"zstd.qcow2", []string{"-o", "compat=0.10"}},
		{"df.qcow2", []string{"-o", "compat=0.10"}},
		{"df.qcow2", []string{"-o", "data_file_raw=on"}},
		{"r.raw", []string{"-f", "raw", "-o", "compat=0.10"}},
	} {
		data, err := os.ReadFile(tc.orig)
		if err != nil {
			t.Fatal(err)
		}
		args := append(append([]string{"amend"}, tc.args...), "w.img")
		var results [2]cmdResult
		var images [2][]byte
		for i, tool := range []func(...string) cmdResult{func(a ...string) cmdResult { return runQemu(t, a...) }, runImgfs} {
			if err := os.WriteFile("w.img", data, 0o644); err != nil {
				t.Fatal(err)
			}
			results[i] = tool(args...)
			if images[i], err = os.ReadFile("w.img"); err != nil {
				t.Fatal(err)
			}
		}
		if results[0] != results[1] {
			t.Errorf("%q:\nqemu-img: %+v\nimgfs:    %+v", args, results[0], results[1])
		}
		if !bytes.Equal(images[0], images[1]) {
			t.Errorf("%q: the images differ (%d and %d bytes)", args, len(images[0]), len(images[1]))
		}
		if strings.HasSuffix(tc.orig, ".qcow2") && tc.orig != "df.qcow2" {
			if out := runQemu(t, "check", "w.img"); out.code != 0 {
				t.Errorf("%q: qemu-img check: %s%s", args, out.stdout, out.stderr)
			}
		}
	}
}
