package tests

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// cliFixtures are the files every CLI contract case starts with.
var cliFixtures = []step{
	create("z.qcow2", "4M", ""),
	qemuIO("qcow2", "z.qcow2", fill(64*kib, 4*mib)...),
	create("other.qcow2", "4M", ""),
	qemuIO("qcow2", "other.qcow2", "write -P 0x11 0 64k", "write -P 0x77 1M 4k"),
	create("small.qcow2", "2M", ""),
	qemuIO("qcow2", "small.qcow2", "write -P 0x11 0 64k"),
	qemuImgStep("convert", "-O", "raw", "z.qcow2", "z.raw"),
	createRaw("t.raw", "1M"),
	qemuIO("raw", "t.raw", "write -P 0x42 4k 8k"),
	createRaw("empty", "0"),
	mkdir("d"),
	// Hostile or broken headers: each field patched in a copy of a
	// fresh image.
	create("v4.qcow2", "4M", ""),
	patch("v4.qcow2", 4, 0, 0, 0, 4), // version 4
	create("cb30.qcow2", "4M", ""),
	patch("cb30.qcow2", 20, 0, 0, 0, 30), // cluster_bits 30
	create("cb8.qcow2", "4M", ""),
	patch("cb8.qcow2", 20, 0, 0, 0, 8), // cluster_bits 8
	create("bigsize.qcow2", "4M", ""),
	patch("bigsize.qcow2", 24, 0, 0, 1, 0, 0, 0, 0, 0), // size 2^40, L1 too small
	create("incompat.qcow2", "4M", ""),
	patch("incompat.qcow2", 72, 0, 0, 0, 0, 0, 0, 0, 0x20), // unknown incompatible bit 5
	create("short.qcow2", "4M", ""),
	truncateFile("short.qcow2", 100),
	// A missing backing file, and two images backing each other (made
	// with -u, which does not open the backing file).
	create("orphan.qcow2", "4M", "", "-u", "-b", "missing.qcow2", "-F", "qcow2"),
	create("loop-a.qcow2", "4M", "", "-u", "-b", "loop-b.qcow2", "-F", "qcow2"),
	create("loop-b.qcow2", "4M", "", "-u", "-b", "loop-a.qcow2", "-F", "qcow2"),
}

// mkdir makes a directory in the fixture.
func mkdir(name string) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// patch overwrites bytes of file at off.
func patch(file string, off int64, b ...byte) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		f, err := os.OpenFile(filepath.Join(dir, file), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// truncateFile cuts file to size bytes.
func truncateFile(file string, size int64) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		if err := os.Truncate(filepath.Join(dir, file), size); err != nil {
			t.Fatal(err)
		}
	}
}

// cliCases are command lines whose behaviour imgfs must share with
// qemu-img: usage errors, missing and broken files, unknown formats and
// options, and the ordinary successes next to them.
var cliCases = [][]string{
	// Program level.
	{},
	{"foo"},
	// info
	{"info"},
	{"info", "nonexist"},
	{"info", "-f", "foo", "z.qcow2"},
	{"info", "--output=xml", "z.qcow2"},
	{"info", "-z", "z.qcow2"},
	{"info", "z.qcow2", "-z"},
	{"info", "--bogus", "z.qcow2"},
	{"info", "z.qcow2", "extra"},
	{"info", "-f"},
	{"info", "--output"},
	{"info", "--output", "json", "z.qcow2"},
	{"info", "z.qcow2", "--output=json"},
	{"info", "-U", "-fqcow2", "z.qcow2"},
	{"info", "--", "z.qcow2"},
	{"info", "-f", "raw", "z.qcow2"},
	{"info", "-f", "qcow2", "t.raw"},
	{"info", "t.raw"},
	{"info", "empty"},
	{"info", "-f", "qcow2", "empty"},
	{"info", "d"},
	{"info", "v4.qcow2"},
	{"info", "cb30.qcow2"},
	{"info", "cb8.qcow2"},
	{"info", "bigsize.qcow2"},
	{"info", "incompat.qcow2"},
	{"info", "short.qcow2"},
	{"info", "-f", "vmdk", "z.qcow2"},
	{"info", "-f", "vdi", "z.qcow2"},
	{"info", "-f", "vpc", "z.qcow2"},
	{"info", "-f", "vhdx", "z.qcow2"},
	{"info", "-f", "parallels", "z.qcow2"},
	{"info", "-f", "vmdk", "empty"},
	{"info", "orphan.qcow2"},
	{"info", "--backing-chain", "orphan.qcow2"},
	{"info", "loop-a.qcow2"},
	{"info", "--backing-chain", "loop-a.qcow2"},
	// qemu-img 7.2 itself hangs in map, check and compare on a backing
	// loop, so only info is compared there.
	{"map", "orphan.qcow2"},
	{"check", "orphan.qcow2"},
	{"convert", "-O", "raw", "orphan.qcow2", "o.raw"},
	// check
	{"check"},
	{"check", "nonexist"},
	{"check", "-r", "foo", "z.qcow2"},
	{"check", "--output=xml", "z.qcow2"},
	{"check", "-q", "z.qcow2"},
	{"check", "-qfqcow2", "z.qcow2"},
	{"check", "z.qcow2", "-q", "--output", "json"},
	{"check", "-f", "raw", "t.raw"},
	{"check", "--output=json", "-f", "raw", "t.raw"},
	{"check", "v4.qcow2"},
	// map
	{"map"},
	{"map", "nonexist"},
	{"map", "--output=xml", "z.qcow2"},
	{"map", "--start-offset=abc", "z.qcow2"},
	{"map", "--max-length=-1", "z.qcow2"},
	{"map", "--start-offset=64k", "--max-length=1M", "z.qcow2"},
	{"map", "--output=json", "--start-offset=100", "--max-length=1000", "z.qcow2"},
	{"map", "--start-offset=5M", "z.qcow2"},
	{"map", "-f", "raw", "d"},
	{"map", "t.raw"},
	// compare
	{"compare", "z.qcow2"},
	{"compare", "z.qcow2", "z.qcow2"},
	{"compare", "z.qcow2", "other.qcow2"},
	{"compare", "-q", "z.qcow2", "other.qcow2"},
	{"compare", "z.qcow2", "nonexist"},
	{"compare", "nonexist", "z.qcow2"},
	{"compare", "z.qcow2", "small.qcow2"},
	{"compare", "-s", "z.qcow2", "small.qcow2"},
	{"compare", "-f", "qcow2", "-F", "raw", "z.qcow2", "z.raw"},
	{"compare", "-s", "-f", "qcow2", "-F", "raw", "z.qcow2", "z.raw"},
	{"compare", "-f", "qcow2", "-F", "raw", "z.qcow2", "t.raw"},
	// convert
	{"convert", "z.qcow2"},
	{"convert", "-O", "foo", "z.qcow2", "o.img"},
	{"convert", "-O", "raw", "nonexist", "o.raw"},
	{"convert", "-O", "raw", "z.qcow2", "o.raw"},
	{"convert", "-c", "-O", "raw", "z.qcow2", "o.raw"},
	{"convert", "-n", "-O", "raw", "z.qcow2", "missing.raw"},
	{"convert", "-O", "qcow2", "-o", "cluster_size=1000", "z.qcow2", "o.qcow2"},
	{"convert", "-O", "qcow2", "-o", "foo=bar", "z.qcow2", "o.qcow2"},
	{"convert", "-O", "qcow2", "-o", "help"},
	{"convert", "-O", "qcow2", "z.qcow2", "other.qcow2", "o.qcow2"},
	// create
	{"create", "-f", "qcow2", "x.qcow2"},
	{"create", "-f", "qcow2", "x.qcow2", "1Q"},
	{"create", "-f", "qcow2", "x.qcow2", "-1"},
	{"create", "-f", "nosuch", "x", "1M"},
	{"create", "-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"},
	{"create", "-f", "raw", "x.raw", "1k", "2k"},
	{"create", "-f", "qcow2", "x.qcow2", "1M"},
	{"create", "-q", "-f", "qcow2", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "x.qcow2", "1.5M"},
	{"create", "-f", "qcow2", "-o", "size=2M", "x.qcow2"},
	{"create", "x.raw", "1M"},
	{"create", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on,compression_type=zstd", "x.qcow2", "64M"},
	{"create", "-f", "qcow2", "-o", "data_file=x.data", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "-b", "z.qcow2", "x.qcow2"},
	{"create", "-f", "qcow2", "-b", "z.qcow2", "-F", "qcow2", "x.qcow2"},
	{"create", "-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "x.qcow2"},
	{"create", "-f", "qcow2", "-u", "-b", "nonexist", "-F", "qcow2", "x.qcow2", "1M"},
	{"create", "-f", "qcow2", "-o", "help"},
	{"create", "-f", "raw", "-o", "help"},
	{"create", "-f", "vmdk", "-o", "help"},
	{"create", "-f", "vmdk", "x.vmdk", "1M"},
	{"create", "-f", "vmdk", "-o", "subformat=nosuch", "x.vmdk", "1M"},
	{"create", "-f", "vdi", "x.vdi", "1M"},
	{"create", "-f", "vpc", "x.vhd", "1M"},
	{"create", "-f", "vhdx", "x.vhdx", "1M"},
	{"create", "-f", "parallels", "x.hds", "1M"},
	{"convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "z.qcow2", "o.vmdk"},
	{"convert", "-O", "vpc", "-o", "subformat=fixed", "z.qcow2", "o.vhd"},
}

// TestCLI runs each contract case with qemu-img and with imgfs, each in
// its own copy of the fixtures, and requires the same stdout, stderr and
// exit code, the same set of files afterwards, and images created alike
// (as `qemu-img info --output=json` sees them).
func TestCLI(t *testing.T) {
	template := t.TempDir()
	runSteps(t, template, cliFixtures)
	for _, args := range cliCases {
		t.Run(testName(append([]string{"qemu-img"}, args...)), func(t *testing.T) {
			t.Parallel()
			refDir, ourDir, refFiles := runBothIn(t, template, args...)
			for _, f := range refFiles {
				if slices.Contains(listDir(t, template), f) {
					continue
				}
				w, g := describeCreated(t, refDir, f), describeCreated(t, ourDir, f)
				if w != g {
					t.Errorf("created %s differs:\n--- qemu-img made:\n%s--- imgfs made:\n%s", f, w, g)
				}
			}
		})
	}
}

// describeCreated is qemu-img's JSON info of a file a command created,
// without the allocation on disk, which depends on how zeroes were
// written rather than on the image, and without VMDK content IDs, which
// qemu-img itself draws at random.
func describeCreated(t *testing.T, dir, file string) string {
	r := run(t, dir, qemuImg, "info", "--output=json", file)
	var keep []string
	for _, l := range strings.SplitAfter(r.stdout+r.stderr, "\n") {
		if !strings.Contains(l, `"actual-size":`) && !strings.Contains(l, `"cid":`) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// copyDir copies the regular files and empty directories of src into
// dst. Copies are not sparse, but both copies of a fixture are made the
// same way, so qemu-img and imgfs see the same disk usage.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		from, to := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		if e.IsDir() {
			if err := os.Mkdir(to, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		data, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(to, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestProgramName runs the binary under its own name: messages must read
// as qemu-img's with the program name swapped, since they are prefixed
// with the name the program was invoked by.
func TestProgramName(t *testing.T) {
	dir := t.TempDir()
	imgfs := imgfsBin()
	for _, args := range [][]string{{}, {"foo"}, {"info"}, {"info", "-z"}, {"info", "nonexist"}} {
		t.Run(testName(append([]string{"imgfs"}, args...)), func(t *testing.T) {
			want := run(t, dir, qemuImg, args...)
			want.stderr = strings.ReplaceAll(want.stderr, "qemu-img", "imgfs")
			if d := diffResults(want, run(t, dir, imgfs, args...)); d != "" {
				t.Errorf("imgfs %s:\n%s", strings.Join(args, " "), d)
			}
		})
	}
}
