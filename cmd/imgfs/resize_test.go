package main

import (
	"os"
	"testing"
)

// imageState is what a command left behind in an image: its size on
// the host, what qemu-img check says, and the allocation map.
func imageState(t *testing.T, file string) cmdResult {
	t.Helper()
	check := runQemu(t, "check", "-U", file)
	m := runQemu(t, "map", "-U", "--output=json", file)
	return cmdResult{
		stdout: check.stdout + m.stdout,
		stderr: check.stderr + m.stderr,
		code:   int(fileSize(t, file)),
	}
}

// sameEffectAsQemu runs args with both tools, each on a fresh copy of
// orig named file, and compares their output and the images they leave.
func sameEffectAsQemu(t *testing.T, orig, file string, args ...string) {
	t.Helper()
	data, err := os.ReadFile(orig)
	if err != nil {
		t.Fatal(err)
	}
	results := [2][2]cmdResult{}
	for i, tool := range []func(...string) cmdResult{func(a ...string) cmdResult { return runQemu(t, a...) }, runImgfs} {
		if err := os.WriteFile(file, data, 0o644); err != nil {
			t.Fatal(err)
		}
		results[i] = [2]cmdResult{tool(args...), imageState(t, file)}
	}
	if results[0] != results[1] {
		t.Errorf("%v on %s:\nqemu-img: %+v\nimage: %+v\nimgfs: %+v\nimage: %+v",
			args, orig, results[0][0], results[0][1], results[1][0], results[1][1])
	}
}

func TestResizeMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "q.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 60M 64k", "q.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "small.qcow2", "1M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 8k", "small.qcow2"),
		qimg("create", "-q", "-f", "raw", "r.raw", "4M"),
		qio("-f", "raw", "-c", "write -P 3 1M 64k", "r.raw"),
	})
	for _, tc := range []struct {
		orig string
		args []string
	}{
		{"q.qcow2", []string{"resize", "c.qcow2", "+1G"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "128M"}},
		{"q.qcow2", []string{"resize", "-q", "c.qcow2", "+64k"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "-1M"}},
		{"q.qcow2", []string{"resize", "--shrink", "c.qcow2", "-1M"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "--shrink", "32M"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "-64M"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "0"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "+1"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "12x"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "18446744073709551615"}},
		{"q.qcow2", []string{"resize", "c.qcow2", "9223372036854775807"}},
		{"q.qcow2", []string{"resize", "--preallocation=metadata", "c.qcow2", "+4M"}},
		{"q.qcow2", []string{"resize", "--preallocation=falloc", "c.qcow2", "+4M"}},
		{"q.qcow2", []string{"resize", "--preallocation=full", "c.qcow2", "+4M"}},
		{"q.qcow2", []string{"resize", "--preallocation=full", "c.qcow2", "64M"}},
		{"q.qcow2", []string{"resize", "--preallocation=bogus", "c.qcow2", "+4M"}},
		{"q.qcow2", []string{"resize", "--image-opts", "driver=qcow2,file.filename=c.qcow2", "+1M"}},
		{"q.qcow2", []string{"resize", "-f", "raw", "c.qcow2", "+1M"}},
		{"small.qcow2", []string{"resize", "-f", "qcow2", "c.qcow2", "+10G"}},
		{"small.qcow2", []string{"resize", "--shrink", "c.qcow2", "4k"}},
		{"r.raw", []string{"resize", "c.raw", "+1M"}},
		{"r.raw", []string{"resize", "-f", "raw", "c.raw", "-1M"}},
		{"r.raw", []string{"resize", "-f", "raw", "--shrink", "c.raw", "-1M"}},
		{"r.raw", []string{"resize", "-f", "raw", "--shrink", "c.raw", "1000"}},
		{"r.raw", []string{"resize", "-f", "raw", "c.raw", "+1"}},
		{"r.raw", []string{"resize", "-f", "raw", "--preallocation=falloc", "c.raw", "+1M"}},
		{"r.raw", []string{"resize", "-f", "raw", "--preallocation=full", "c.raw", "+1M"}},
		{"r.raw", []string{"resize", "-f", "raw", "--preallocation=metadata", "c.raw", "+1M"}},
		{"r.raw", []string{"resize", "-f", "qcow2", "c.raw", "+1M"}},
	} {
		file := "c.qcow2"
		if tc.orig == "r.raw" {
			file = "c.raw"
		}
		sameEffectAsQemu(t, tc.orig, file, tc.args...)
	}
}

// The size is taken off the end before options are read, so these fail
// as they do in qemu-img.
func TestResizeUsageMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{qimg("create", "-q", "-f", "qcow2", "q.qcow2", "1M")})
	for _, args := range [][]string{
		{"resize"},
		{"resize", "q.qcow2"},
		{"resize", "--help"},
		{"resize", "-q"},
		{"resize", "-f", "qcow2", "q.qcow2"},
		{"resize", "a", "b", "c"},
		{"resize", "-x", "q.qcow2", "1G"},
		{"resize", "--shrink=1", "q.qcow2", "1G"},
		{"resize", "-U", "q.qcow2", "1G"},
		{"resize", "q.qcow2", "-f"},
		{"resize", "q.qcow2", "--help"},
		{"resize", "nope", "1G"},
		{"resize", "--object", "bogus", "q.qcow2", "1G"},
	} {
		sameAsQemu(t, args...)
	}
}

// TestResizeShrinkWithSnapshots: qemu-img 7.2 shrinks images that have
// internal snapshots; the snapshots keep their clusters. The host file
// layout may differ from qemu's, so this compares content, not bytes.
func TestResizeShrinkWithSnapshots(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "s.qcow2", "16M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 16M", "s.qcow2"),
		qimg("snapshot", "-c", "s1", "s.qcow2"),
		qio("-f", "qcow2", "-c", "write -P 2 0 2M", "-c", "write -P 3 10M 2M", "s.qcow2"),
		qimg("convert", "-O", "raw", "-l", "s1", "s.qcow2", "snap.raw"),
		qimg("convert", "-O", "raw", "s.qcow2", "active.raw"),
	})
	want := runQemu(t, "resize", "-f", "raw", "--shrink", "active.raw", "3M")
	if got := runImgfs("resize", "--shrink", "s.qcow2", "3M"); got != want {
		t.Fatalf("resize: got %+v, qemu-img on the raw copy %+v", got, want)
	}
	for _, args := range [][]string{
		{"check", "s.qcow2"},
		{"compare", "-F", "raw", "s.qcow2", "active.raw"},
	} {
		if r := runQemu(t, args...); r.code != 0 {
			t.Errorf("qemu-img %v: %+v", args, r)
		}
	}
	// Applying the snapshot brings back its own size and content.
	if r := runQemu(t, "snapshot", "-a", "s1", "s.qcow2"); r.code != 0 {
		t.Fatalf("apply: %+v", r)
	}
	if r := runQemu(t, "compare", "-F", "raw", "s.qcow2", "snap.raw"); r.code != 0 {
		t.Errorf("the snapshot changed: %+v", r)
	}
}
