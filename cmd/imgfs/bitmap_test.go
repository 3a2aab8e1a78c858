package main

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// bitmapState is what a bitmap command leaves in an image: the qcow2
// part of qemu-img info, whether qemu-img check finds it clean, and the
// bits of every bitmap as this driver reads them.
func bitmapState(t *testing.T, file string) string {
	t.Helper()
	var b strings.Builder
	info := runQemu(t, "info", "-U", file).stdout
	if i := strings.Index(info, "Format specific"); i >= 0 {
		b.WriteString(info[i:])
	}
	b.WriteString(runQemu(t, "check", "-U", file).stdout[:len("No errors were found on the image.")])
	img, err := formats.Open(file, formats.OpenOptions{Format: "qcow2", ReadOnly: true, ForceShare: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	bm := img.(formats.Bitmapper)
	list, err := bm.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range list {
		if l.InUse {
			continue
		}
		d, err := bm.BitmapData(l.Name)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("\n" + l.Name + ": ")
		b.Write(bytes.TrimRight(d.Bits, "\x00"))
	}
	return b.String()
}

var nodeNameRE = regexp.MustCompile(`#block[0-9]+`)

func TestBitmapMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "64M"),
		qimg("bitmap", "--add", "base.qcow2", "b0"),
		qimg("bitmap", "--add", "--disable", "-g", "4k", "base.qcow2", "d1"),
		qio("-c", "write 0 64k", "-c", "write 1M 3k", "base.qcow2"),
		qimg("bitmap", "--add", "-g", "512", "base.qcow2", "fine"),
		qio("-c", "write 5000 70000", "-c", "write 40M 1M", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "same.qcow2", "64M"),
		qimg("bitmap", "--add", "-g", "1k", "same.qcow2", "s"),
		qio("-c", "write 7M 1k", "same.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "small.qcow2", "32M"),
		qimg("bitmap", "--add", "small.qcow2", "s"),
		qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"),
		qimg("create", "-q", "-f", "qcow2", "huge.qcow2", "1P"),
		qimg("create", "-q", "-f", "raw", "r.raw", "1M"),
		qimg("create", "-q", "-f", "qcow2", "crash.qcow2", "64M"),
		// A crash leaves every bitmap QEMU had open inconsistent.
		qimg("bitmap", "--add", "crash.qcow2", "bad"),
		qioCrash("-c", "write 0 64k", "crash.qcow2"),
		qimg("bitmap", "--add", "crash.qcow2", "ok"),
		qimg("bitmap", "--add", "--disable", "crash.qcow2", "off"),
	})
	long := strings.Repeat("n", 1024)
	for _, tc := range []struct {
		orig string
		args []string
	}{
		{"base.qcow2", []string{"--add", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "--disable", "-g", "64k", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "-g", "0", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "-g", "1000", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "-g", "4G", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "-g", "2G", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "-g", "abc", "w.qcow2", "n1"}},
		{"base.qcow2", []string{"--add", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--add", "w.qcow2", ""}},
		{"base.qcow2", []string{"--add", "w.qcow2", long}},
		{"v2.qcow2", []string{"--add", "w.qcow2", "x"}},
		{"huge.qcow2", []string{"--add", "-g", "512", "w.qcow2", "x"}},
		{"base.qcow2", []string{"--remove", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--remove", "--remove", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--remove", "w.qcow2", "nope"}},
		{"base.qcow2", []string{"--clear", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--clear", "w.qcow2", "nope"}},
		{"base.qcow2", []string{"--disable", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--disable", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--enable", "--clear", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--enable", "w.qcow2", "nope"}},
		{"base.qcow2", []string{"--merge", "b0", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--merge", "fine", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--merge", "b0", "--merge", "fine", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--merge", "nope", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--merge", "b0", "w.qcow2", "nope"}},
		{"base.qcow2", []string{"--merge", "s", "-b", "same.qcow2", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--merge", "s", "-b", "same.qcow2", "-F", "qcow2", "w.qcow2", "fine"}},
		{"base.qcow2", []string{"--merge", "s", "-b", "small.qcow2", "w.qcow2", "d1"}},
		{"base.qcow2", []string{"--add", "--merge", "b0", "--disable", "w.qcow2", "n"}},
		{"base.qcow2", []string{"w.qcow2", "b0"}},
		{"base.qcow2", []string{"-g", "64k", "--remove", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"-F", "qcow2", "--remove", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"-b", "same.qcow2", "--remove", "w.qcow2", "b0"}},
		{"base.qcow2", []string{"--remove", "w.qcow2"}},
		{"base.qcow2", []string{"--remove", "w.qcow2", "b0", "extra"}},
		{"r.raw", []string{"-f", "raw", "--add", "w.qcow2", "x"}},
		{"r.raw", []string{"-f", "raw", "--remove", "w.qcow2", "x"}},
		{"crash.qcow2", []string{"--enable", "w.qcow2", "bad"}},
		{"crash.qcow2", []string{"--clear", "w.qcow2", "bad"}},
		{"crash.qcow2", []string{"--merge", "bad", "w.qcow2", "off"}},
		{"crash.qcow2", []string{"--remove", "w.qcow2", "bad"}},
		{"crash.qcow2", []string{"--add", "w.qcow2", "new"}},
	} {
		data, err := os.ReadFile(tc.orig)
		if err != nil {
			t.Fatal(err)
		}
		args := append([]string{"bitmap"}, tc.args...)
		var results [2]cmdResult
		var states [2]string
		for i, tool := range []func(...string) cmdResult{func(a ...string) cmdResult { return runQemu(t, a...) }, runImgfs} {
			if err := os.WriteFile("w.qcow2", data, 0o644); err != nil {
				t.Fatal(err)
			}
			results[i] = tool(args...)
			if strings.HasSuffix(tc.orig, ".qcow2") {
				states[i] = bitmapState(t, "w.qcow2")
			}
		}
		if len(tc.args) > 0 && len(tc.args[len(tc.args)-1]) > 100 {
			args = append(args[:len(args)-1], "<long name>")
		}
		// QEMU's automatic node names count nodes it made internally.
		for i := range results {
			results[i].stderr = nodeNameRE.ReplaceAllString(results[i].stderr, "#block")
		}
		if results[0] != results[1] {
			t.Errorf("%q:\nqemu-img: %+v\nimgfs:    %+v", args, results[0], results[1])
		}
		if states[0] != states[1] {
			t.Errorf("%q leaves a different image:\nqemu-img: %q\nimgfs:    %q", args, states[0], states[1])
		}
	}
}

// TestConvertBitmapsMatchesQemu: convert --bitmaps copies every bitmap
// (granularity, state and bits) as qemu-img does, and refuses or skips
// inconsistent ones with its messages.
func TestConvertBitmapsMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "src.qcow2", "64M"),
		qimg("bitmap", "--add", "src.qcow2", "x1"),
		qimg("bitmap", "--add", "-g", "4k", "--disable", "src.qcow2", "x2"),
		qio("-c", "write 1M 5k", "-c", "write 30M 100k", "src.qcow2"),
		qimg("bitmap", "--add", "-g", "512", "src.qcow2", "x3"),
		qio("-c", "write 7000 3", "src.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "broken.qcow2", "64M"),
		qimg("bitmap", "--add", "broken.qcow2", "b0"),
		qimg("bitmap", "--add", "broken.qcow2", "b1"),
		qioCrash("-c", "write 0 64k", "broken.qcow2"),
		qimg("bitmap", "--add", "broken.qcow2", "good"),
		qimg("create", "-q", "-f", "raw", "r.raw", "1M"),
	})
	for _, args := range [][]string{
		{"--bitmaps", "-O", "qcow2", "src.qcow2", "out.qcow2"},
		{"--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "src.qcow2", "out.qcow2"},
		{"--bitmaps", "-O", "raw", "src.qcow2", "out.qcow2"},
		{"--bitmaps", "-O", "qcow2", "src.qcow2", "src.qcow2", "out.qcow2"},
		{"--bitmaps", "-O", "qcow2", "-f", "raw", "r.raw", "out.qcow2"},
		{"--bitmaps", "-O", "qcow2", "broken.qcow2", "out.qcow2"},
		{"--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "broken.qcow2", "out.qcow2"},
	} {
		args = append([]string{"convert"}, args...)
		var results [2]cmdResult
		var states [2]string
		for i, tool := range []func(...string) cmdResult{func(a ...string) cmdResult { return runQemu(t, a...) }, runImgfs} {
			os.Remove("out.qcow2")
			results[i] = tool(args...)
			if results[i].code == 0 {
				states[i] = bitmapState(t, "out.qcow2")
			}
		}
		if results[0] != results[1] {
			t.Errorf("%q:\nqemu-img: %+v\nimgfs:    %+v", args, results[0], results[1])
		}
		if states[0] != states[1] {
			t.Errorf("%q leaves a different image:\nqemu-img: %q\nimgfs:    %q", args, states[0], states[1])
		}
	}
}
