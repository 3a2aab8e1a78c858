package main

import (
	"strings"
	"testing"
)

// rebaseFixtures adds to chainFixtures the manual's diff recipe (two
// raw images, an overlay of the modified one to be rebased onto the
// original), a raw image, and an image with 512-byte clusters whose
// header has little room.
func rebaseFixtures() []fixture {
	return append(chainFixtures(),
		qimg("create", "-q", "-f", "raw", "orig.raw", "1M"),
		qio("-f", "raw", "-c", "write -P 1 0 1M", "orig.raw"),
		qimg("create", "-q", "-f", "raw", "modified.raw", "1M"),
		qio("-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 4k 1k", "-c", "write -z 512k 64k", "modified.raw"),
		qimg("create", "-q", "-f", "qcow2", "-b", "modified.raw", "-F", "raw", "diff.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", "small.qcow2"),
	)
}

func TestRebaseMatchesQemu(t *testing.T) {
	template := buildFixtures(t, rebaseFixtures())
	images := append(chainImages, "orig.raw", "modified.raw", "diff.qcow2", "small.qcow2")
	long := strings.Repeat("n", 450)
	for _, args := range [][]string{
		{"-b", "other.qcow2", "-F", "qcow2", "top.qcow2"},      // between unrelated bases
		{"-b", "orig.raw", "-F", "raw", "diff.qcow2"},          // the manual's diff recipe
		{"-b", "base.qcow2", "-F", "qcow2", "-p", "top.qcow2"}, // onto an image of the chain
		{"-b", "mid.qcow2", "-F", "qcow2", "-p", "top.qcow2"},  // onto its own backing file
		{"-b", "", "top.qcow2"},                                // flatten
		{"-p", "-b", "", "-F", "qcow2", "mid.qcow2"},
		{"-b", "other.qcow2", "-F", "qcow2", "-t", "none", "-T", "directsync", "-p", "v2.qcow2"},
		{"-u", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"},  // unsafe
		{"-u", "-b", "gone.qcow2", "-F", "qcow2", "small.qcow2"}, // need not exist
		{"-u", "top.qcow2"}, // removes the backing file
		{"-u", "-b", "", "orphan.qcow2"},
		{"-b", "other.qcow2", "top.qcow2"}, // copies, then wants -F
		{"-u", "-b", "other.qcow2", "top.qcow2"},
		{"-u", "-b", long, "-F", "qcow2", "small.qcow2"}, // no room in the header
		{"-b", "nope.qcow2", "-F", "qcow2", "-p", "top.qcow2"},
		{"-b", "top.qcow2", "-F", "qcow2", "top.qcow2"}, // locked
		{"-b", "other.qcow2", "-F", "bogus", "top.qcow2"},
		{"-b", "other.qcow2", "-F", "qcow2", "orphan.qcow2"},
		{"-f", "raw", "-b", "other.qcow2", "-F", "qcow2", "short.raw"},
		{"-f", "raw", "-u", "short.raw"},
		{"top.qcow2"},
		{"-b", "other.qcow2", "-t", "bogus", "top.qcow2"},
		{"-b", "other.qcow2", "-T", "bogus", "-p", "top.qcow2"},
		{"-u", "-b", "x", "-F", "qcow2"},
	} {
		// The rebased image is the last argument.
		runMutation(t, template, images, mutationCase{args: append([]string{"rebase"}, args...), sameAllocation: args[len(args)-1]})
	}
}

// TestRebaseCompress covers rebase -c, which qemu-img 7.2 lacks (it is
// in the 9.0 manual): the guest content stays, the merged clusters are
// stored compressed, and formats that cannot compress refuse.
func TestRebaseCompress(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "8M"),
		qio("-c", "write -P 0x41 0 3M", "-c", "write -P 0x42 5M 100k", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"),
		qio("-c", "write -P 0x55 1M 64k", "top.qcow2"),
		qimg("convert", "-O", "raw", "top.qcow2", "want.raw"),
		qimg("create", "-q", "-f", "raw", "plain.raw", "1M"),
	})
	if r := runImgfs("rebase", "-c", "-b", "", "top.qcow2"); r.code != 0 {
		t.Fatalf("rebase -c: %+v", r)
	}
	if r := runQemu(t, "compare", "-U", "top.qcow2", "want.raw"); r.code != 0 {
		t.Fatalf("content changed: %s%s", r.stdout, r.stderr)
	}
	r := runQemu(t, "check", "--output=json", "top.qcow2")
	if r.code != 0 || !strings.Contains(r.stdout, `"compressed-clusters": 49`) {
		t.Errorf("want 49 compressed clusters (3M + 100k of merged data), check said %d:\n%s%s", r.code, r.stdout, r.stderr)
	}
	want := cmdResult{"", "qemu-img: Compression not supported for this file format\n", 1}
	if r := runImgfs("rebase", "-c", "-f", "raw", "-u", "-b", "", "plain.raw"); r != want {
		t.Errorf("raw: got %+v, want %+v", r, want)
	}
}
