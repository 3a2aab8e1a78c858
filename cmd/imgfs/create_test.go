package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreateMatchesQemu runs create command lines with qemu-img and with
// imgfs in the same directory. Output and exit code must match, and
// every image imgfs creates must be what qemu-img creates for the same
// line: the same `qemu-img info` (apart from disk usage) and allocation.
func TestCreateMatchesQemu(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img not installed: run `make test`, which installs it")
	}
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "raw", "base.raw", "3M"),
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "5M"),
		qimg("create", "-q", "-f", "raw", "a b,c.raw", "1M"),
		{fn: func(dir string) error { return os.Mkdir(filepath.Join(dir, "sub"), 0o755) }},
		qimg("create", "-q", "-f", "raw", "sub/sbase.raw", "2M"),
	})
	cases := [][]string{
		{"create", "x.img", "1M"},
		{"create", "-f", "raw", "x.img", "1.5k"},
		{"create", "-f", "raw", "x.img", "1000"},
		{"create", "-f", "raw", "x.img", "0x200"},
		{"create", "-f", "raw", "x.img", " 1"},
		{"create", "-f", "raw", "x.img", "1.0000001k"},
		{"create", "-f", "raw", "x.img", "1kb"},
		{"create", "-f", "raw", "x.img", "1.5"},
		{"create", "-f", "raw", "x.img", "1e3"},
		{"create", "-f", "raw", "x.img", ""},
		{"create", "-f", "raw", "x.img", "8E"},
		{"create", "-f", "raw", "x.img", "16E"},
		{"create", "-f", "raw", "x.img", "99999999999999999999"},
		{"create", "-f", "raw", "x.img", "7E"},
		{"create", "-f", "raw"},
		{"create", "x.img", "1M", "2M"},
		{"create", "-f", "foo", "x.img", "1M"},
		{"create", "-f", "foo", "-o", "help"},
		{"create", "-o", "help"},
		{"create", "-o", "?", "x.img"},
		{"create", "-f", "qcow2", "-o", "help"},
		{"create", "-f", "qcow2", "-o", "cluster_size=4k,help", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "help", "-o", "foo", "x.img"},
		{"create", "-q", "x.img", "1M"},
		{"create", "x.img", "1M", "-q"},
		{"create", "-o", ",", "x.img", "1M"},
		{"create", "-o", "size=1M,,", "x.img"},
		{"create", "-o", "size=1M", "x.img"},
		{"create", "-o", "size=1M", "x.img", "1M"},
		{"create", "-o", "foo=1", "x.img", "1M"},
		{"create", "x.img"},
		{"create", "-o", "preallocation=full", "x.img", "1M"},
		{"create", "-o", "preallocation=falloc,nocow=on", "x.img", "1M"},
		{"create", "-f", "qcow2", "x.img", "1M"},
		{"create", "-f", "qcow2", "x.img", "100M"},
		{"create", "-f", "qcow2", "-o", "cluster_size=4k", "-o", "lazy_refcounts", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "x.img", "1G"},
		{"create", "-f", "qcow2", "-o", "compat=0.10,refcount_bits=1", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "compression_type=zstd", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "preallocation=metadata", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "cluster_size=1000", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "cluster_size=4k,,", "x.img", "1M"},
		{"create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "x.img"},
		{"create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.img"},
		{"create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.img", "7M"},
		{"create", "-f", "qcow2", "-b", "base.qcow2", "x.img"},
		{"create", "-f", "qcow2", "-b", "base.qcow2", "-u", "x.img", "1M"},
		{"create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-u", "x.img"},
		{"create", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "x.img"},
		{"create", "-f", "qcow2", "-b", "nonexist", "-F", "raw", "x.img"},
		{"create", "-f", "qcow2", "-b", "sbase.raw", "-F", "raw", "sub/x.img"},
		{"create", "-f", "qcow2", "-b", "a b,c.raw", "-F", "raw", "x y,z.img"},
		{"create", "-f", "qcow2", "-o", "backing_file=a b,,c.raw,backing_fmt=raw", "x.img"},
		{"create", "-f", "qcow2", "-b", "x.img", "-F", "qcow2", "x.img"},
		{"create", "-f", "qcow2", "-b", "", "-F", "qcow2", "x.img", "1M"},
		{"create", "-f", "raw", "-b", "base.raw", "-F", "raw", "x.img"},
		{"create", "-f", "raw", "-F", "raw", "x.img", "1M"},
		{"create", "-f", "qcow2", "x.img", "7E"},
		{"create", "-f", "qcow2", "-o", "cluster_size=512", "x.img", "4P"},
		{"create", "--object", "secret,id=s0,data=x", "-f", "qcow2", "x.img", "1M"},
		{"create", "--object", "foo", "x.img", "1M"},
	}
	for _, args := range cases {
		outs := []string{"x.img", "x y,z.img", "sub/x.img"}
		for _, o := range outs {
			os.Remove(o)
		}
		want := runQemu(t, args...)
		// qemu-img's image moves aside, in its directory so that a
		// relative backing file name still resolves.
		created, ref := "", ""
		for _, o := range outs {
			if _, err := os.Stat(o); err == nil {
				created, ref = o, filepath.Join(filepath.Dir(o), "ref")
				if err := os.Rename(o, ref); err != nil {
					t.Fatal(err)
				}
			}
		}
		got := runImgfs(args...)
		if want != got {
			t.Errorf("%q:\nexit code: qemu-img %d, imgfs %d\n--- qemu-img stdout:\n%s--- imgfs stdout:\n%s"+
				"--- qemu-img stderr:\n%q\n--- imgfs stderr:\n%q", args, want.code, got.code,
				want.stdout, got.stdout, want.stderr, got.stderr)
			continue
		}
		if created == "" || want.code != 0 {
			continue
		}
		if w, g := describe(t, ref), describe(t, created); w != g {
			t.Errorf("%q: qemu-img info differs\n--- qemu-img's image:\n%s--- imgfs's image:\n%s", args, w, g)
		}
		format := "raw"
		if strings.Contains(strings.Join(args, " "), "qcow2 ") {
			format = "qcow2"
			if r := runQemu(t, "check", created); r.code != 0 {
				t.Errorf("%q: qemu-img check: %s%s", args, r.stdout, r.stderr)
			}
		}
		if w, g := allocation(t, format, ref), allocation(t, format, created); w != g {
			t.Errorf("%q: allocation differs\n--- qemu-img:\n%s--- imgfs:\n%s", args, w, g)
		}
	}
}

// describe is `qemu-img info` of file with the lines that depend on the
// host (file name, disk usage) left out.
func describe(t *testing.T, file string) string {
	t.Helper()
	r := runQemu(t, "info", "-U", file)
	if r.code != 0 {
		t.Fatalf("qemu-img info %s: %s", file, r.stderr)
	}
	var keep []string
	for _, l := range strings.Split(r.stdout, "\n") {
		if strings.HasPrefix(l, "image:") || strings.HasPrefix(l, "disk size:") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}
