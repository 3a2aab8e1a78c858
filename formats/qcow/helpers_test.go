package qcow

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// Helpers for the differential tests, which run the real qemu-img and
// qemu-io (tests only). Read-only qemu-img calls pass -U: with parallel
// subtests a forked child can briefly hold OFD locks of files this
// process already closed.

func haveQemu(t testing.TB) {
	t.Helper()
	for _, p := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed", p)
		}
	}
}

// run executes a command and fails the test when it does not succeed,
// retrying the lock conflicts a parallel test's child can cause.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	for try := 0; ; try++ {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err == nil {
			return string(out)
		}
		if !strings.Contains(string(out), "Failed to get") || try == 50 {
			t.Fatalf("%s %q: %v\n%s", name, args, err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// createImage creates an image with our driver from an -o list.
func createImage(t testing.TB, name, opts string) error {
	t.Helper()
	d := formats.Lookup("qcow")
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return d.Create(name, o)
}

func openImage(t testing.TB, name string, readOnly bool) formats.Image {
	t.Helper()
	img, err := openRetry(name, formats.OpenOptions{Format: "qcow", ReadOnly: readOnly})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// openRetry is formats.Open, retrying the lock conflicts a forked child
// of a parallel test can briefly cause by sharing our open files.
func openRetry(name string, o formats.OpenOptions) (formats.Image, error) {
	for try := 0; ; try++ {
		img, err := formats.Open(name, o)
		if err == nil || !strings.Contains(err.Error(), "Failed to get") || try == 50 {
			return img, err
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
	run(t, "qemu-img", "convert", "-U", "-f", "qcow", "-O", "raw", name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDiff returns the offset of the first differing byte, or -1.
func firstDiff(a, b []byte) int {
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

// compareReports checks that qemu-img info and map, human and JSON,
// print what control.Info and control.Map print for the image.
func compareReports(t *testing.T, name string) {
	t.Helper()
	open := func(filename, format string) (formats.Image, error) {
		return openRetry(filename, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true})
	}
	info, err := control.Info(control.InfoOptions{Filename: name, Format: "qcow", Open: open})
	if err != nil {
		t.Fatal(err)
	}
	img, err := formats.Open(name, formats.OpenOptions{Format: "qcow", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	m := control.Map(context.Background(), control.MapOptions{Image: img, MaxLength: -1})
	mh := control.Map(context.Background(), control.MapOptions{Image: img, MaxLength: -1, Human: true})
	mapJSON, err := m.JSON()
	if err != nil {
		mapJSON += "qemu-img: " + err.Error() + "\n"
	}
	// qemu-img refuses a human map of compressed clusters; then the
	// message is compared.
	mapHuman, err := mh.Human()
	if err != nil {
		mapHuman += "qemu-img: " + err.Error() + "\n"
	}
	for _, c := range []struct {
		args []string
		ours string
	}{
		{[]string{"info", "--output=json"}, info.JSON()},
		{[]string{"info"}, info.Human()},
		{[]string{"map", "--output=json"}, mapJSON},
		{[]string{"map"}, mapHuman},
	} {
		var stdout, stderr strings.Builder
		cmd := exec.Command("qemu-img", append(append(c.args, "-U", "-f", "qcow"), name)...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		cmd.Run()
		want := stdout.String() + stderr.String()
		if c.ours != want {
			t.Errorf("qemu-img %s %s:\n%s\nours:\n%s", strings.Join(c.args, " "), filepath.Base(name), want, c.ours)
		}
	}
}
