package qcow2

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// Test helpers shared by the differential tests. They run the real
// qemu-img and qemu-io (tests only; product code never does). Read-only
// qemu-img calls pass -U: images are closed by then, but with parallel
// subtests a forked child of another test can briefly keep a closed
// file's OFD locks alive.

func haveQemu(t testing.TB) {
	t.Helper()
	formatstest.RequireQemu(t)
}

// lockRace reports a lock conflict that only a forked child of a
// parallel subtest can cause: it briefly shares the open file
// descriptions of files this process already closed, and with them
// their OFD locks. Retrying after a moment resolves it.
func lockRace(msg string) bool {
	return strings.Contains(msg, "Failed to get") && strings.Contains(msg, "lock")
}

// execOut executes a command and fails the test when it does not
// succeed.
func execOut(t testing.TB, name string, args ...string) string {
	t.Helper()
	for try := 0; ; try++ {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err == nil {
			return string(out)
		}
		if !lockRace(string(out)) || try == 50 {
			t.Fatalf("%s %q: %v\n%s", name, args, err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// qemuIO runs qemu-io commands on a qcow2 image.
func qemuIO(t testing.TB, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	execOut(t, "qemu-io", append(args, img)...)
}

// createOpts creates an image with our driver.
func createOpts(t testing.TB, name, opts string) error {
	t.Helper()
	o := formats.NewOptions(Driver.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return Driver.Create(name, o)
}

// openRW opens an image with our driver.
func openImg(t testing.TB, name string, readOnly bool) *Image {
	t.Helper()
	for try := 0; ; try++ {
		img, err := formats.Open(name, formats.OpenOptions{Format: "qcow2", ReadOnly: readOnly})
		if err == nil {
			return img.(*Image)
		}
		if !lockRace(err.Error()) || try == 50 {
			t.Fatalf("open %s: %v", name, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readAll reads the whole guest content.
func readAll(t testing.TB, img formats.Image) []byte {
	t.Helper()
	buf := make([]byte, img.Size())
	if n, err := img.ReadAt(buf, 0); err != nil || n != len(buf) {
		t.Fatalf("read %s: %d, %v", img.Filename(), n, err)
	}
	return buf
}

// rawOf converts an image to raw with qemu-img and returns the bytes.
func rawOf(t testing.TB, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	execOut(t, "qemu-img", "convert", "-U", "-O", "raw", name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mustBeClean fails the test unless qemu-img check finds the image clean.
func mustBeClean(t testing.TB, name string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-U", "-f", "qcow2", name).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("No errors were found on the image.")) {
		t.Fatalf("qemu-img check %s: %v\n%s", name, err, out)
	}
}

// diffOffset returns the offset of the first differing byte, or -1.
func diffOffset(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
