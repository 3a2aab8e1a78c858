package main

import (
	"bytes"
	"os"
	"testing"
)

// TestDDMatchesQemu runs each dd with both tools into the same output
// name and compares what they print and the images they create.
func TestDDMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "src.qcow2", "4M"),
		qio("-f", "qcow2", "-c", "write -P 0x11 0 100k", "-c", "write -P 0x22 1M 64k", "-c", "write -z 2M 8k",
			"-c", "write -P 0x33 4092k 4k", "src.qcow2"),
		qimg("create", "-q", "-f", "raw", "src.raw", "1000k"),
		qio("-f", "raw", "-c", "write -P 0x44 3k 5k", "src.raw"),
	})
	for _, args := range [][]string{
		{"dd", "if=src.qcow2", "of=out.raw"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=64k", "count=3", "skip=1"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=1000", "count=3", "skip=1"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=1.5k", "skip=7"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=0x10", "count=5"},
		{"dd", "if=src.qcow2", "of=out.raw", "count=1E"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=1k", "count=0"},
		{"dd", "if=src.qcow2", "of=out.raw", "skip=100000"},
		{"dd", "if=src.qcow2", "of=out.raw", "skip=1E", "bs=1k"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=1k", "bs=3k", "if=src.raw"},
		{"dd", "-O", "qcow2", "if=src.qcow2", "of=out.qcow2", "bs=64k", "count=20", "skip=1"},
		{"dd", "-O", "qcow2", "if=src.raw", "of=out.qcow2", "bs=1000", "skip=3"},
		{"dd", "-f", "raw", "if=src.qcow2", "of=out.raw"},
		{"dd", "-U", "--image-opts", "if=driver=qcow2,file.filename=src.qcow2", "of=out.raw", "bs=1M"},
	} {
		out := "out.raw"
		if args[1] == "-O" {
			out = "out.qcow2"
		}
		os.Remove(out)
		want := runQemu(t, args...)
		wantData, _ := os.ReadFile(out)
		wantState := imageState(t, out)
		if err := os.Rename(out, "want-"+out); err != nil {
			t.Fatal(err)
		}
		got := runImgfs(args...)
		gotData, _ := os.ReadFile(out)
		gotState := imageState(t, out)
		if want != got || wantState != gotState {
			t.Errorf("%v:\nqemu-img: %+v\n%+v\nimgfs: %+v\n%+v", args, want, wantState, got, gotState)
		}
		if out == "out.raw" && !bytes.Equal(wantData, gotData) {
			t.Errorf("%v: the outputs differ", args)
		}
		if out == "out.qcow2" {
			if r := runQemu(t, "compare", "-U", "-s", "want-"+out, out); r.code != 0 {
				t.Errorf("%v: the outputs differ: %+v", args, r)
			}
		}
	}
}

func TestDDErrorsMatchQemu(t *testing.T) {
	buildFixtures(t, []fixture{qimg("create", "-q", "-f", "qcow2", "src.qcow2", "1M")})
	for _, args := range [][]string{
		{"dd"},
		{"dd", "if=src.qcow2"},
		{"dd", "of=out.raw"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=0"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=-1"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs=2G"},
		{"dd", "if=src.qcow2", "of=out.raw", "bs="},
		{"dd", "if=src.qcow2", "of=out.raw", "count=-1"},
		{"dd", "if=src.qcow2", "of=out.raw", "skip=x"},
		{"dd", "if=src.qcow2", "of=out.raw", "foo=1"},
		{"dd", "if=src.qcow2", "of=out.raw", "foo"},
		{"dd", "if=src.qcow2", "of=out.raw", "=x"},
		{"dd", "bs=0", "foo"},
		{"dd", "if=nope", "of=out.raw"},
		{"dd", "-O", "bogus", "if=src.qcow2", "of=out.raw"},
		{"dd", "-O", "bogus", "if=nope", "of=out.raw"},
		{"dd", "-x", "if=src.qcow2", "of=out.raw"},
		{"dd", "-O"},
		{"dd", "if=src.qcow2", "of=nodir/out.raw"},
	} {
		sameAsQemu(t, args...)
	}
}
