package tests

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// inspectCommands are the read-only commands whose output must equal
// qemu-img's on every matrix image.
var inspectCommands = [][]string{
	{"info"},
	{"info", "--output=json"},
	{"map"},
	{"map", "--output=json"},
	{"check"},
	{"check", "--output=json"},
}

// chainCommands are compared in addition on images with backing files.
var chainCommands = [][]string{
	{"info", "--backing-chain"},
	{"info", "--backing-chain", "--output=json"},
}

// TestMatrix builds every image of the matrix with qemu-img and qemu-io
// and holds imgfs to qemu-img on it: the inspecting commands print the
// same bytes, convert -O raw writes the same bytes, compare with the raw
// conversion reports the same, and convert -O qcow2
// (plain and compressed) writes an image qemu-img finds clean and equal
// to the source.
func TestMatrix(t *testing.T) {
	for _, c := range matrix() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			runSteps(t, dir, c.steps)
			cmds := inspectCommands
			if c.chain {
				cmds = append(append([][]string{}, cmds...), chainCommands...)
			}
			for _, cmd := range cmds {
				t.Run(testName(cmd), func(t *testing.T) {
					differential(t, dir, append(cmd, c.file())...)
				})
			}
			// Mounted before the conversions add files to the directory.
			t.Run("mount", func(t *testing.T) { checkMount(t, dir, c) })
			t.Run("convert-raw", func(t *testing.T) { checkConvertRaw(t, dir, c) })
			// qemu-img's raw conversion is the same content with a
			// different allocation, which compare -s reports.
			for _, strict := range [][]string{{}, {"-s"}} {
				args := append(append([]string{"compare"}, strict...), "-f", c.fmt(), "-F", "raw", c.file(), "ref.raw")
				t.Run(testName(args), func(t *testing.T) { differential(t, dir, args...) })
			}
			t.Run("convert-qcow2", func(t *testing.T) { checkConvertQcow2(t, dir, c, false) })
			t.Run("convert-qcow2-compressed", func(t *testing.T) { checkConvertQcow2(t, dir, c, true) })
		})
	}
}

// testName turns a command line into a subtest name.
func testName(args []string) string { return strings.Join(args, "_") }

// maxConvertAlloc bounds the disk space a converted matrix image may
// take: the largest image holds a few MiB of data.
const maxConvertAlloc = 256 * mib

// checkConvertRaw converts the image to raw with both programs and
// requires identical files, and an output no less sparse than qemu-img's
// (within a MiB).
func checkConvertRaw(t *testing.T, dir string, c imageCase) {
	want := mustRun(t, dir, qemuImg, "convert", "-f", c.fmt(), "-O", "raw", c.file(), "ref.raw")
	got := convertOurs(t, dir, "-f", c.fmt(), "-O", "raw", c.file(), "ours.raw")
	if d := diffResults(want, got); d != "" {
		t.Errorf("convert -O raw:\n%s", d)
	}
	if got.code != 0 {
		return
	}
	ref, out := filepath.Join(dir, "ref.raw"), filepath.Join(dir, "ours.raw")
	if c.big {
		// Too large to read: equal sizes, and qemu-img compare (which
		// skips holes) finds no difference.
		refInfo, err1 := os.Stat(ref)
		outInfo, err2 := os.Stat(out)
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if refInfo.Size() != outInfo.Size() {
			t.Errorf("raw size: qemu-img %d, imgfs %d", refInfo.Size(), outInfo.Size())
		}
		if r := run(t, dir, qemuImg, "compare", "-f", "raw", "-F", "raw", "ref.raw", "ours.raw"); r.code != 0 {
			t.Errorf("qemu-img compare ref.raw ours.raw: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	} else {
		a, err1 := os.ReadFile(ref)
		b, err2 := os.ReadFile(out)
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("convert -O raw: imgfs output differs from qemu-img's (%d vs %d bytes, first difference at %d)",
				len(a), len(b), firstByteDiff(a, b))
		}
	}
	if ra, oa := allocated(ref), allocated(out); oa > ra+mib {
		t.Errorf("convert -O raw: imgfs output occupies %d bytes on disk, qemu-img's %d", oa, ra)
	}
}

// convertOurs runs imgfs convert with args, whose last one is the
// output file, under the allocation guard.
func convertOurs(t *testing.T, dir string, args ...string) result {
	t.Helper()
	out := filepath.Join(dir, args[len(args)-1])
	return runGuarded(t, dir, &allocGuard{file: out, max: maxConvertAlloc}, ours, append([]string{"convert"}, args...)...)
}

func firstByteDiff(a, b []byte) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// checkConvertQcow2 converts the image to qcow2 with imgfs, optionally
// compressed, and requires qemu-img check to find the output clean and
// qemu-img compare to find it equal to the source. A compressed output
// must hold as many compressed clusters as qemu-img's own convert -c
// writes from the same source.
func checkConvertQcow2(t *testing.T, dir string, c imageCase, compressed bool) {
	out, ref := "ours.qcow2", "ref.qcow2"
	args := []string{"-f", c.fmt(), "-O", "qcow2"}
	if compressed {
		out, ref = "ours-c.qcow2", "ref-c.qcow2"
		args = append(args, "-c")
	}
	want := mustRun(t, dir, qemuImg, append(append([]string{"convert"}, args...), c.file(), ref)...)
	got := convertOurs(t, dir, append(args, c.file(), out)...)
	if d := diffResults(want, got); d != "" {
		t.Fatalf("convert %v:\n%s", args, d)
	}
	if r := run(t, dir, qemuImg, "check", out); r.code != 0 {
		t.Errorf("qemu-img check %s: exit %d\n%s%s", out, r.code, r.stdout, r.stderr)
	}
	if r := run(t, dir, qemuImg, "compare", "-f", c.fmt(), "-F", "qcow2", c.file(), out); r.code != 0 {
		t.Errorf("qemu-img compare %s %s: exit %d\n%s%s", c.file(), out, r.code, r.stdout, r.stderr)
	}
	if compressed {
		w, g := compressedClusters(t, dir, ref), compressedClusters(t, dir, out)
		if w != g {
			t.Errorf("convert -c: imgfs wrote %d compressed clusters, qemu-img %d", g, w)
		}
	}
}

// compressedClusters asks qemu-img check how many compressed clusters
// the image holds.
func compressedClusters(t *testing.T, dir, file string) int64 {
	t.Helper()
	r := run(t, dir, qemuImg, "check", "--output=json", file)
	var report struct {
		Compressed int64 `json:"compressed-clusters"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &report); err != nil {
		t.Fatalf("qemu-img check --output=json %s: %v\n%s%s", file, err, r.stdout, r.stderr)
	}
	return report.Compressed
}
