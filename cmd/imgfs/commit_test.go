package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// chainFixtures builds base.qcow2 <- mid.qcow2 <- top.qcow2, where the
// top (2 MiB) is larger than the rest (1 MiB), an unrelated image
// other.qcow2, a v2 image over a short raw base, and an image whose
// backing file is missing.
func chainFixtures() []fixture {
	return []fixture{
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "1M"),
		qio("-c", "write -P 1 0 64k", "-c", "write -P 2 128k 64k", "-c", "write -P 6 960k 64k", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"),
		qio("-c", "write -P 3 64k 64k", "-c", "write -z 128k 32k", "-c", "write -P 3 300k 1k", "mid.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "2M"),
		qio("-c", "write -P 4 0 4k", "-c", "write -z 128k 4k", "-c", "write -P 5 1536k 64k", "-c", "write -P 7 1000k 48k", "top.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "other.qcow2", "1536k"),
		qio("-c", "write -P 7 0 128k", "-c", "write -P 1 1M 64k", "other.qcow2"),
		qimg("create", "-q", "-f", "raw", "short.raw", "512k"),
		qio("-f", "raw", "-c", "write -P 9 0 512k", "short.raw"),
		qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "short.raw", "-F", "raw", "v2.qcow2", "1M"),
		qio("-c", "write -P 8 100k 600k", "-c", "write -z 800k 100k", "v2.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M"),
	}
}

// chainImages are the fixture images whose content and backing
// reference every case compares.
var chainImages = []string{"base.qcow2", "mid.qcow2", "top.qcow2", "other.qcow2", "short.raw", "v2.qcow2"}

// mutationCase is one command that changes images: both tools run it on
// their own copy of the fixtures.
type mutationCase struct {
	args []string
	// progress: stdout has a -p line whose redraws depend on QEMU's
	// event loop; it is compared by its ends only.
	progress bool
	// sameAllocation names an image whose own allocation (the depth 0
	// ranges of qemu-img map) must come out as qemu-img's: the emptied
	// top of a commit, the rebased image. Commit's base is not among
	// them: QEMU copies whole 64 KiB granules of unchanged data too.
	sameAllocation string
}

// runMutation runs args with qemu-img and with imgfs on identical
// copies of the fixtures in template and compares exit codes and
// output, and afterwards every image either tool changed: content
// (qemu-img compare), backing reference and size (qemu-img info), and
// that qemu-img check finds nothing on ours.
func runMutation(t *testing.T, template string, images []string, tc mutationCase) {
	t.Helper()
	qdir, odir := copyFixtures(t, template), copyFixtures(t, template)
	t.Chdir(qdir)
	want := runQemu(t, tc.args...)
	t.Chdir(odir)
	got := runImgfs(tc.args...)
	name := strings.Join(tc.args, " ")
	if tc.progress {
		for _, r := range []*cmdResult{&want, &got} {
			if !strings.HasPrefix(r.stdout, "    (0.00/100%)\r") || !strings.Contains(r.stdout, "    (100.00/100%)\r\n") {
				t.Errorf("%s: progress line %q", name, r.stdout)
			}
			r.stdout = r.stdout[strings.LastIndex(r.stdout, "\r")+1:]
		}
	}
	if want != got {
		t.Errorf("qemu-img %s:\nexit code: qemu-img %d, imgfs %d\n--- qemu-img stdout:\n%s--- imgfs stdout:\n%s"+
			"--- qemu-img stderr:\n%s--- imgfs stderr:\n%s", name, want.code, got.code, want.stdout, got.stdout, want.stderr, got.stderr)
	}
	if img := tc.sameAllocation; img != "" {
		if w, g := ownAllocation(qdir, img), ownAllocation(odir, img); w != g {
			t.Errorf("%s: allocation of %s:\nqemu-img:\n%s\nimgfs:\n%s", name, img, w, g)
		}
	}
	var wg sync.WaitGroup
	for _, img := range images {
		q, o := readFixture(t, qdir, img), readFixture(t, odir, img)
		if bytes.Equal(q, o) {
			// Changed to exactly qemu-img's bytes, or untouched. This
			// also covers images whose new backing file does not exist,
			// which qemu-img compare cannot open.
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := exec.Command("qemu-img", "compare", "-U", filepath.Join(qdir, img), filepath.Join(odir, img)).CombinedOutput()
			if err != nil {
				t.Errorf("%s: %s differs from qemu-img's result: %v\n%s", name, img, err, out)
			}
			if w, g := backingInfo(qdir, img), backingInfo(odir, img); w != g {
				t.Errorf("%s: info of %s:\nqemu-img:\n%s\nimgfs:\n%s", name, img, w, g)
			}
			if filepath.Ext(img) != ".qcow2" {
				return
			}
			if out, err := exec.Command("qemu-img", "check", "-U", filepath.Join(odir, img)).CombinedOutput(); err != nil {
				t.Errorf("%s: check %s: %v\n%s", name, img, err, out)
			}
		}()
	}
	wg.Wait()
}

// copyFixtures copies the files of template into a new directory.
func copyFixtures(t *testing.T, template string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(template)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.WriteFile(filepath.Join(dir, e.Name()), readFixture(t, template, e.Name()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func readFixture(t *testing.T, dir, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ownAllocation lists the ranges the image itself allocates, from
// qemu-img map, without host offsets.
func ownAllocation(dir, img string) string {
	cmd := exec.Command("qemu-img", "map", "-U", "--output=json", img)
	cmd.Dir = dir
	out, _ := cmd.CombinedOutput()
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, `"depth": 0,`) {
			keep = append(keep, regexp.MustCompile(`, "offset": \d+`).ReplaceAllString(l, ""))
		}
	}
	return strings.Join(keep, "\n")
}

// backingInfo is the part of qemu-img info that commit and rebase may
// change: the virtual size and the backing file lines.
func backingInfo(dir, img string) string {
	cmd := exec.Command("qemu-img", "info", "-U", img)
	cmd.Dir = dir
	out, _ := cmd.CombinedOutput()
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "virtual size:") || strings.HasPrefix(l, "backing file") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func TestCommitMatchesQemu(t *testing.T) {
	template := buildFixtures(t, chainFixtures())
	for _, tc := range []mutationCase{
		{args: []string{"commit", "top.qcow2"}, sameAllocation: "top.qcow2"}, // into mid, which grows
		{args: []string{"commit", "-d", "top.qcow2"}},                        // top keeps its data
		{args: []string{"commit", "-b", "base.qcow2", "top.qcow2"}},          // through mid
		{args: []string{"commit", "-q", "-b", "mid.qcow2", "top.qcow2"}},
		{args: []string{"commit", "-f", "qcow2", "-t", "none", "-r", "1G", "mid.qcow2"}, sameAllocation: "mid.qcow2"},
		{args: []string{"commit", "v2.qcow2"}, sameAllocation: "v2.qcow2"}, // v2 into a short raw base
		{args: []string{"commit", "-p", "top.qcow2"}, progress: true},
		{args: []string{"commit", "-b", "nope.qcow2", "top.qcow2"}},
		{args: []string{"commit", "-b", "top.qcow2", "top.qcow2"}},
		{args: []string{"commit", "base.qcow2"}},
		{args: []string{"commit", "-f", "raw", "short.raw"}},
		{args: []string{"commit", "orphan.qcow2"}},
		{args: []string{"commit", "-r", "1x", "top.qcow2"}},
		{args: []string{"commit", "-t", "bogus", "top.qcow2"}},
		{args: []string{"commit", "top.qcow2", "mid.qcow2"}},
	} {
		runMutation(t, template, chainImages, tc)
	}
}
