package vhdx

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// Test helpers shared by the differential tests, which run the real
// qemu-img and qemu-io (tests only; product code never does). Read-only
// qemu-img calls pass -U: with parallel subtests a forked child of
// another test can briefly keep a closed file's OFD locks alive.

func haveQemu(t testing.TB) {
	t.Helper()
	for _, p := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed", p)
		}
	}
}

// run executes a command and fails the test when it does not succeed.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands on a vhdx image.
func qemuIO(t testing.TB, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "vhdx"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, "qemu-io", append(args, img)...)
}

// createOpts creates an image with our driver.
func createOpts(t testing.TB, name, opts string) error {
	t.Helper()
	d := formats.Lookup("vhdx")
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return d.Create(name, o)
}

// openImg opens an image with our driver.
func openImg(t testing.TB, name string, readOnly bool) formats.Image {
	t.Helper()
	img, err := formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: readOnly})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return img
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
	run(t, "qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mustBeClean fails the test unless qemu-img check finds the image clean.
func mustBeClean(t testing.TB, name string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-U", "-f", "vhdx", name).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("No errors were found on the image.")) {
		t.Fatalf("qemu-img check %s: %v\n%s", name, err, out)
	}
}

// diffOffset returns the offset of the first differing byte, or -1.
func diffOffset(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
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

// haveQemuImg reports whether qemu-img is installed, for tests that
// compare with it when they can.
func haveQemuImg() bool {
	_, err := exec.LookPath("qemu-img")
	return err == nil
}
