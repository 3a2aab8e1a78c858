package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// convertFixtures are the sources the convert tests read: raw and qcow2
// images with data, zero runs inside data, zero clusters, compressed
// clusters, several cluster sizes and a backing chain.
func convertFixtures() []fixture {
	return []fixture{
		qimg("create", "-q", "-f", "raw", "raw.img", "4M"),
		qio("-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0 2M 64k", "-c", "write -P 0x12 3145728 1024",
			"-c", "write -P 0x13 3200k 1k", "-c", "write -P 0x14 3208k 2k",
			// Zero runs inside data that start and end off 4 KiB
			// boundaries: -S's alignment rules decide what is a hole.
			"-c", "write -P 0x15 3300k 64k", "-c", "write -P 0 3379712 9728", "-c", "write -P 0 3392000 5000",
			"-c", "write -P 0 3403776 20480", "raw.img"),
		qimg("create", "-q", "-f", "qcow2", "q64.qcow2", "8M"),
		qioWrites("qcow2", "q64.qcow2", 65536, "-c", "write -z 1M 128k", "-c", "write -P 0 2M 128k",
			"-c", "write -c -P 0x55 4M 64k", "-c", "write -P 0x56 5M 8k", "-c", "write -P 0x57 5128k 4k"),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "c512.qcow2", "2M"),
		qioWrites("qcow2", "c512.qcow2", 512),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m.qcow2", "16M"),
		qioWrites("qcow2", "c2m.qcow2", 2<<20),
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "8M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -P 2 4M 64k", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"),
		qio("-f", "qcow2", "-c", "write -P 3 512k 64k", "-c", "write -z 1M 64k", "-c", "write -P 4 6M 4k", "top.qcow2"),
		// An overlay larger than its backing file.
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "long.qcow2", "16M"),
		qio("-f", "qcow2", "-c", "write -P 6 7M 2M", "-c", "write -z 12M 64k", "-c", "write -P 7 14M 4k", "long.qcow2"),
		qimg("create", "-q", "-f", "raw", "empty.raw", "64M"),
		qimg("create", "-q", "-f", "raw", "odd.raw", "1000"),
		qio("-f", "raw", "-c", "write -P 0x21 0 1000", "odd.raw"),
	}
}

// convertCase is one convert command line; "out" is its target. prep
// makes the target first (for -n).
type convertCase struct {
	args []string
	prep [][]string
	// compareTo is the image the output must equal: "" for the first
	// source, "-" for qemu-img's output.
	compareTo string
	// format is the output's format when -O does not say it.
	format string
}

func convertCases() []convertCase {
	qcowTarget := [][]string{{"qemu-img", "create", "-q", "-f", "qcow2", "out", "8M"}}
	garbageQcow := append(slices.Clone(qcowTarget), []string{"qemu-io", "-f", "qcow2", "-c", "write -P 0xff 0 8M", "out"})
	garbageRaw := [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", "out", "4M"},
		{"qemu-io", "-f", "raw", "-c", "write -P 0xff 0 4M", "out"},
	}
	return []convertCase{
		{args: []string{"-O", "raw", "q64.qcow2", "out"}},
		{args: []string{"-f", "raw", "-O", "raw", "raw.img", "out"}},
		{args: []string{"-f", "raw", "-O", "raw", "-S", "8k", "raw.img", "out"}},
		{args: []string{"-f", "raw", "-O", "raw", "-S", "512", "raw.img", "out"}},
		{args: []string{"-O", "qcow2", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "-o", "compression_type=zstd", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "raw.img", "out"}},
		{args: []string{"-O", "qcow2", "-S", "0", "q64.qcow2", "out"}},
		{args: []string{"-O", "raw", "-S", "0", "raw.img", "out"}},
		{args: []string{"-f", "raw", "-O", "qcow2", "raw.img", "out"}},
		{args: []string{"-O", "qcow2", "-S", "64k", "raw.img", "out"}},
		{args: []string{"-O", "qcow2", "-S", "1k", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "cluster_size=4k", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "cluster_size=2M", "c512.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "c2m.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "c2m.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "-o", "cluster_size=512", "c512.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-c", "-S", "0", "c512.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "preallocation=metadata", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "preallocation=falloc", "raw.img", "out"}},
		{args: []string{"-O", "raw", "-o", "preallocation=full", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "compat=0.10", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "top.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2", "out"}},
		{args: []string{"-n", "-O", "qcow2", "q64.qcow2", "out"}, prep: garbageQcow},
		{args: []string{"-n", "--target-is-zero", "-O", "qcow2", "q64.qcow2", "out"}, prep: qcowTarget},
		{args: []string{"-n", "raw.img", "out"}, prep: garbageRaw},
		{args: []string{"-n", "-S", "0", "-O", "qcow2", "top.qcow2", "out"}, prep: garbageQcow},
		{args: []string{"-f", "raw", "odd.raw", "raw.img", "out"}, compareTo: "-"},
		{args: []string{"-c", "-O", "qcow2", "odd.raw", "q64.qcow2", "out"}, compareTo: "-"},
		{args: []string{"-n", "--target-image-opts", "q64.qcow2", "driver=qcow2,file.filename=out"},
			prep: garbageQcow, format: "qcow2"},
		{args: []string{"-p", "-O", "qcow2", "q64.qcow2", "out"}},
		{args: []string{"-p", "-O", "qcow2", "-c", "q64.qcow2", "out"}},
		{args: []string{"-p", "-S", "0", "raw.img", "out"}},
		// 32 steps of 3.125%: the printed values round as C's do.
		{args: []string{"-p", "-S", "0", "empty.raw", "out"}},
		{args: []string{"-W", "-m", "16", "-O", "qcow2", "q64.qcow2", "out"}},
		{args: []string{"-m", "1", "-t", "writeback", "-O", "qcow2", "q64.qcow2", "out"}},
		{args: []string{"-C", "-O", "qcow2", "q64.qcow2", "out"}},
		{args: []string{"-t", "none", "-O", "raw", "q64.qcow2", "out"}},
		{args: []string{"-c", "-O", "qcow2", "-o", "preallocation=falloc", "q64.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "long.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "long.qcow2", "out"}},
		{args: []string{"-O", "qcow2", "-S", "0", "-B", "base.qcow2", "-F", "qcow2", "long.qcow2", "out"}},
		// A source without a backing file: its holes become zero
		// clusters over the new backing file.
		{args: []string{"-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "raw.img", "out"}},
		// A target backing file shorter than the source; as -B assumes
		// the source's own backing data, compare with qemu-img's output.
		{args: []string{"-O", "qcow2", "-B", "c512.qcow2", "-F", "qcow2", "top.qcow2", "out"}, compareTo: "-"},
		{args: []string{"-O", "qcow2", "-c", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out"}},
	}
}

// TestConvertMatchesQemu converts each source with qemu-img and with
// imgfs. Both must print the same and exit alike; imgfs's output must
// equal the source (qemu-img compare), pass qemu-img check, and have the
// same allocation as qemu-img's output (qemu-img map without host
// offsets), so holes and zero clusters land where qemu-img puts them.
// Compressed outputs must be about as small as qemu-img's.
func TestConvertMatchesQemu(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img not installed: run `make test`, which installs it")
	}
	buildFixtures(t, convertFixtures())
	for _, tc := range convertCases() {
		name := strings.Join(tc.args, " ")
		prep := func() {
			os.Remove("out")
			for _, p := range tc.prep {
				if out, err := exec.Command(p[0], p[1:]...).CombinedOutput(); err != nil {
					t.Fatalf("%s: %v\n%s", strings.Join(p, " "), err, out)
				}
			}
		}
		args := append([]string{"convert"}, tc.args...)
		prep()
		want := runQemu(t, args...)
		if err := os.Rename("out", "ref"); err != nil && want.code == 0 {
			t.Fatal(err)
		}
		prep()
		got := runImgfs(args...)
		if want != got {
			t.Errorf("convert %s:\nexit code: qemu-img %d, imgfs %d\n--- qemu-img stdout:\n%q\n--- imgfs stdout:\n%q\n"+
				"--- qemu-img stderr:\n%s--- imgfs stderr:\n%s", name, want.code, got.code, want.stdout, got.stdout, want.stderr, got.stderr)
			continue
		}
		if want.code != 0 {
			continue
		}
		checkConverted(t, name, tc)
	}
}

func checkConverted(t *testing.T, name string, tc convertCase) {
	t.Helper()
	src := tc.args[len(tc.args)-2]
	outFmt := "raw"
	if tc.format != "" {
		outFmt = tc.format
	}
	for i, a := range tc.args {
		if a == "-O" {
			outFmt = tc.args[i+1]
		}
	}
	if tc.compareTo == "-" {
		// A concatenation equals qemu-img's own concatenation.
		if r := runQemu(t, "compare", "-f", outFmt, "-F", outFmt, "ref", "out"); r.code != 0 {
			t.Errorf("%s: output differs from qemu-img's: %s%s", name, r.stdout, r.stderr)
		}
	} else if r := runQemu(t, "compare", "-F", outFmt, src, "out"); r.code != 0 {
		t.Errorf("%s: output differs from the source: %s%s", name, r.stdout, r.stderr)
	}
	if outFmt == "qcow2" {
		if r := runQemu(t, "check", "out"); r.code != 0 {
			t.Errorf("%s: qemu-img check: exit %d\n%s%s", name, r.code, r.stdout, r.stderr)
		}
	}
	if w, g := allocation(t, outFmt, "ref"), allocation(t, outFmt, "out"); w != g {
		t.Errorf("%s: allocation differs from qemu-img's output\n--- qemu-img:\n%s\n--- imgfs:\n%s", name, w, g)
	}
	if slices.Contains(tc.args, "-c") {
		w, g := fileSize(t, "ref"), fileSize(t, "out")
		if g > w+w/20+64<<10 {
			t.Errorf("%s: compressed output has %d bytes, qemu-img's %d", name, g, w)
		}
	}
}

// allocation is `qemu-img map --output=json` without host offsets, which
// depend on the order a driver allocates clusters in; runs that differed
// only in their offsets are merged.
func allocation(t *testing.T, format, file string) string {
	t.Helper()
	r := runQemu(t, "map", "-f", format, "--output=json", file)
	if r.code != 0 {
		t.Fatalf("qemu-img map %s: %s", file, r.stderr)
	}
	type run struct {
		Start, Length, Depth int64
		Present, Zero, Data  bool
	}
	var entries []run
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil {
		t.Fatal(err)
	}
	var merged []run
	for _, e := range entries {
		if n := len(merged); n > 0 {
			last := &merged[n-1]
			if last.Depth == e.Depth && last.Present == e.Present && last.Zero == e.Zero && last.Data == e.Data {
				last.Length += e.Length
				continue
			}
		}
		merged = append(merged, e)
	}
	var b strings.Builder
	for _, e := range merged {
		fmt.Fprintf(&b, "%+v\n", e)
	}
	return b.String()
}

func fileSize(t *testing.T, name string) int64 {
	t.Helper()
	st, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestConvertErrorsMatchQemu compares convert's checks of its command
// line and of the images, which happen before anything is copied.
func TestConvertErrorsMatchQemu(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img not installed: run `make test`, which installs it")
	}
	buildFixtures(t, append(convertFixtures(),
		qimg("create", "-q", "-f", "raw", "small.raw", "1M"),
		// A compressed cluster whose deflate stream is garbage: reads
		// of it fail with EIO. qemu-img puts the first compressed
		// cluster of a new 1 MiB image at 0x50000.
		qimg("create", "-q", "-f", "qcow2", "bad.qcow2", "1M"),
		qio("-f", "qcow2", "-c", "write -c -P 0x41 0 64k", "-c", "write -P 0x42 64k 64k", "bad.qcow2"),
		patchFile("bad.qcow2", 0x50000, bytes.Repeat([]byte{0xff}, 64)...),
	))
	for _, args := range [][]string{
		{"convert"},
		{"convert", "raw.img"},
		{"convert", "-O", "foo", "raw.img", "o"},
		{"convert", "nonexist", "o"},
		{"convert", "-p", "nonexist", "o"},
		{"convert", "-c", "raw.img", "o"},
		{"convert", "-O", "qcow2", "-B", "base.qcow2", "raw.img", "raw.img", "o"},
		{"convert", "-O", "qcow2", "-o", "backing_file=base.qcow2", "raw.img", "o"},
		{"convert", "-O", "raw", "-B", "base.qcow2", "-F", "qcow2", "raw.img", "o"},
		{"convert", "-O", "raw", "-F", "qcow2", "raw.img", "o"},
		{"convert", "-n", "-o", "cluster_size=4k", "raw.img", "o"},
		{"convert", "--target-is-zero", "raw.img", "o"},
		{"convert", "--target-image-opts", "raw.img", "o"},
		{"convert", "-n", "--target-is-zero", "-B", "base.qcow2", "raw.img", "small.raw"},
		{"convert", "-S", "1000", "raw.img", "o"},
		{"convert", "-S", "32M", "raw.img", "o"},
		{"convert", "-S", "x", "raw.img", "o"},
		{"convert", "-S", "16E", "raw.img", "o"},
		{"convert", "-m", "0", "raw.img", "o"},
		{"convert", "-m", "17", "raw.img", "o"},
		{"convert", "-m", "0x10", "-O", "qcow2", "raw.img", "o"},
		{"convert", "-t", "foo", "raw.img", "o"},
		{"convert", "-T", "foo", "raw.img", "o"},
		{"convert", "-n", "raw.img", "nonexist.raw"},
		{"convert", "-n", "raw.img", "small.raw"},
		{"convert", "-o", "help", "raw.img", "o"},
		{"convert", "-O", "qcow2", "-o", "help"},
		{"convert", "-O", "qcow2", "-o", "cluster_size=4k,?", "raw.img", "o"},
		{"convert", "--target-image-opts", "-n", "-o", "help"},
		{"convert", "-O", "qcow2", "-o", "foo=1", "raw.img", "o"},
		{"convert", "-O", "qcow2", "-o", "cluster_size=1000", "raw.img", "o"},
		{"convert", "-o", ",", "raw.img", "o"},
		{"convert", "-C", "-c", "raw.img", "o"},
		{"convert", "-C", "-S", "0", "raw.img", "o"},
		{"convert", "-C", "--salvage", "raw.img", "o"},
		{"convert", "--skip-broken-bitmaps", "raw.img", "o"},
		{"convert", "-c", "-O", "qcow2", "-o", "preallocation=full", "raw.img", "o"},
		{"convert", "-c", "-O", "qcow2", "-o", "encrypt.format=luks", "raw.img", "o"},
		{"convert", "-r", "x", "raw.img", "o"},
		{"convert", "-q", "-p", "raw.img", "o"},
		{"convert", "bad.qcow2", "o"},
		{"convert", "--salvage", "bad.qcow2", "o"},
		{"convert", "-q", "--salvage", "bad.qcow2", "o"},
		{"convert", "--salvage", "-c", "-O", "qcow2", "bad.qcow2", "o"},
	} {
		os.Remove("o")
		sameAsQemu(t, args...)
	}
}
