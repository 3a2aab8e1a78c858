package formatstest

import (
	"bytes"
	"context"
	"encoding/json"
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
// qemu-io and other fixture tools (tests only; product code never does).
//
// With parallel tests, a child that another test forks inherits this
// process's open files for a moment, and with them the OFD locks of
// images already closed here. The helpers retry the lock conflicts
// ("Failed to get ... lock") this causes, and read-only qemu-img calls
// pass -U.

// RequireTools fails the test unless every named program is installed.
// Tests never skip for a missing tool: `make test` installs them.
func RequireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			t.Fatalf("%s not installed: run `make test`, which installs it", name)
		}
	}
}

// RequireQemu is RequireTools for qemu-img and qemu-io.
func RequireQemu(t testing.TB) {
	t.Helper()
	RequireTools(t, "qemu-img", "qemu-io")
}

// lockRetries and lockRetryDelay bound how long a lock conflict may last
// before it counts as a real failure: far longer than a fork and exec.
const (
	lockRetries    = 50
	lockRetryDelay = 20 * time.Millisecond
)

// retryLocked calls try until it succeeds, fails with a message that is
// not a passing failure, or has been retried lockRetries times. try
// returns its error and the message to look for the failure in. Passing
// failures are lock conflicts (a parallel test's forked child briefly
// holds OFD locks of files this process closed) and qemu-img's PBKDF2
// benchmark for LUKS, which Debian's 7.2 fails now and then on a busy
// machine ("Unable to get accurate CPU usage").
func retryLocked(try func() (msg string, err error)) {
	for i := 0; ; i++ {
		msg, err := try()
		passing := strings.Contains(msg, "Failed to get") || strings.Contains(msg, "Unable to get accurate CPU usage")
		if err == nil || !passing || i == lockRetries {
			return
		}
		time.Sleep(lockRetryDelay)
	}
}

// Exec runs a program and returns its combined output, failing the test
// unless it succeeds.
func Exec(t testing.TB, name string, args ...string) string {
	t.Helper()
	var out []byte
	var err error
	retryLocked(func() (string, error) {
		out, err = exec.Command(name, args...).CombinedOutput()
		return string(out), err
	})
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// QemuIO runs qemu-io commands on an image of the format.
func QemuIO(t testing.TB, format, name string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return Exec(t, "qemu-io", append(args, name)...)
}

// Create creates an image with the registered driver of the format from
// an -o option list (which includes the size). It fails the test when
// the list does not parse and returns the driver's error.
func Create(t testing.TB, format, name, opts string) error {
	t.Helper()
	d := formats.Lookup(format)
	if d == nil {
		t.Fatalf("no driver %q registered", format)
	}
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return d.Create(name, o)
}

// OpenRetry is formats.Open, retrying lock conflicts.
func OpenRetry(name string, o formats.OpenOptions) (formats.Image, error) {
	var img formats.Image
	var err error
	retryLocked(func() (string, error) {
		img, err = formats.Open(name, o)
		if err != nil {
			return err.Error(), err
		}
		return "", nil
	})
	return img, err
}

// Open opens an image, retrying lock conflicts, and fails the test when
// it cannot. The image is closed when the test ends (closing it earlier
// is fine).
func Open(t testing.TB, name string, o formats.OpenOptions) formats.Image {
	t.Helper()
	img, err := OpenRetry(name, o)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// ReadAll reads the whole guest content of an image.
func ReadAll(t testing.TB, img formats.Image) []byte {
	t.Helper()
	buf := make([]byte, img.Size())
	if n, err := img.ReadAt(buf, 0); err != nil || n != len(buf) {
		t.Fatalf("read %s: %d, %v", img.Filename(), n, err)
	}
	return buf
}

// QemuRaw returns an image's guest content as qemu-img convert -O raw
// writes it.
func QemuRaw(t testing.TB, format, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	Exec(t, "qemu-img", "convert", "-U", "-f", format, "-O", "raw", name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// SameAsQemuRaw fails the test unless img reads exactly as qemu-img
// convert -O raw of its file, and returns the content.
func SameAsQemuRaw(t testing.TB, img formats.Image) []byte {
	t.Helper()
	got, want := ReadAll(t, img), QemuRaw(t, img.Format(), img.Filename())
	if i := FirstDiff(got, want); i >= 0 {
		t.Fatalf("%s: byte %d differs from qemu-img convert -O raw (sizes %d, %d)", img.Filename(), i, len(got), len(want))
	}
	return got
}

// QemuVirtualSize is the virtual size qemu-img info reports.
func QemuVirtualSize(t testing.TB, format, name string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(Exec(t, "qemu-img", "info", "-U", "-f", format, "--output=json", name)), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// WriteTemp writes b to a file called base in a new t.TempDir() and
// returns its name.
func WriteTemp(t testing.TB, base string, b []byte) string {
	t.Helper()
	name := filepath.Join(t.TempDir(), base)
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

// Patch passes change the n bytes of a file at off and writes them back.
func Patch(t testing.TB, name string, off int64, n int, change func([]byte)) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	change(b)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// ReadHostile is the body of a driver's FuzzOpen: OpenHostile, then
// WalkHostile. Errors are expected; panics, hangs and allocations beyond
// the hostile-image limits are what it finds. A FuzzOpen that checks
// more between the two calls them itself.
func ReadHostile(t *testing.T, format string, data []byte) {
	if img := OpenHostile(t, format, data); img != nil {
		WalkHostile(t, img)
	}
}

// OpenHostile opens data as an image of the format, read-only and
// without its backing file (a hostile image must not make us open files
// it names), or returns nil when the driver refuses it. The image closes
// when the test ends.
func OpenHostile(t *testing.T, format string, data []byte) formats.Image {
	img, err := formats.Open(WriteTemp(t, "fuzz."+format, data), formats.OpenOptions{Format: format, ReadOnly: true, NoBacking: true})
	if err != nil {
		return nil
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// WalkHostile reads the start and the end of a hostile image and walks
// its block status, reading the start of each extent. It fails the test
// on an extent of no length, which would hang a caller's walk, and
// returns the first BlockStatus error for the drivers that must not
// give one.
func WalkHostile(t *testing.T, img formats.Image) error {
	p := make([]byte, 64<<10)
	img.ReadAt(p, 0)
	img.ReadAt(p, max(img.Size()-1000, 0))
	// At most 1000 extents: a hostile image may hold millions of tiny
	// ones.
	for off, i := int64(0), 0; off < img.Size() && i < 1000; i++ {
		e, err := img.BlockStatus(off, img.Size()-off)
		if err != nil {
			return err
		}
		if e.Length <= 0 {
			t.Fatalf("BlockStatus(%d) returned length %d", off, e.Length)
		}
		img.ReadAt(p[:4096], off)
		off += e.Length
	}
	return nil
}

// FirstDiff returns the offset of the first differing byte, the length
// of the shorter slice when one is a prefix of the other, or -1 when
// they are equal.
func FirstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// SameInfoAndMap fails the test unless qemu-img info and map, human and
// JSON, print what control.Info and control.Map print for the image:
// the same standard output, the same standard error (after our
// program name) and failing alike. A human map fails after its heading
// on data without a host offset, in QEMU too.
func SameInfoAndMap(t *testing.T, format, name string) {
	t.Helper()
	syncDir(t, filepath.Dir(name))
	open := func(filename, format string) (formats.Image, error) {
		return OpenRetry(filename, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true})
	}
	info, err := control.Info(control.InfoOptions{Filename: name, Format: format, Open: open})
	if err != nil {
		t.Fatal(err)
	}
	img, err := OpenRetry(name, formats.OpenOptions{Format: format, ReadOnly: true})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	// Closed on return: the caller may write the image or its backing
	// file next.
	defer img.Close()
	m := control.Map(context.Background(), control.MapOptions{Image: img, MaxLength: -1})
	mapJSON, err := m.JSON()
	if err != nil {
		t.Fatal(err)
	}
	mh := control.Map(context.Background(), control.MapOptions{Image: img, MaxLength: -1, Human: true})
	mapHuman, err := mh.Human()
	mapErr := ""
	if err != nil {
		mapErr = "qemu-img: " + err.Error() + "\n"
	}
	for _, c := range []struct {
		args             []string
		ours, oursStderr string
	}{
		{[]string{"info", "--output=json"}, info.JSON(), ""},
		{[]string{"info"}, info.Human(), ""},
		{[]string{"map", "--output=json"}, mapJSON, ""},
		{[]string{"map"}, mapHuman, mapErr},
	} {
		stdout, stderr, err := qemuImg(append(append(c.args, "-U", "-f", format), name)...)
		if c.ours != stdout || c.oursStderr != stderr || (err != nil) != (c.oursStderr != "") {
			t.Errorf("qemu-img %s %s (%v):\n%s%s\nours:\n%s%s", strings.Join(c.args, " "), filepath.Base(name), err,
				stdout, stderr, c.ours, c.oursStderr)
		}
	}
}

// syncDir flushes the files in dir, where an image keeps its extent
// and backing files too. Writeback of data just written allocates
// filesystem metadata blocks (ext4 delayed allocation), which changes a
// file's allocated size, the "disk size" info reports, between our
// measurement and qemu-img's.
func syncDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// qemuImg runs qemu-img, retrying lock conflicts, and returns its
// standard output and error. Lines where QEMU reports one of its own
// modules missing (the installed QEMU lacks dmg-bz2 and dmg-lzfse) are
// dropped from the error: that is packaging, not output to match.
func qemuImg(args ...string) (stdout, stderr string, err error) {
	retryLocked(func() (string, error) {
		var o, e strings.Builder
		cmd := exec.Command("qemu-img", args...)
		cmd.Stdout, cmd.Stderr = &o, &e
		err = cmd.Run()
		stdout, stderr = o.String(), e.String()
		return stderr, err
	})
	var kept strings.Builder
	for _, l := range strings.SplitAfter(stderr, "\n") {
		if !strings.HasPrefix(l, "qemu: module ") {
			kept.WriteString(l)
		}
	}
	return stdout, kept.String(), err
}

// SameFiles fails the test unless the files a and b hold the same bytes,
// as an image we create or write must equal the one qemu-img or qemu-io
// makes of the same steps.
func SameFiles(t testing.TB, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if i := FirstDiff(x, y); i >= 0 {
		t.Errorf("%s and %s differ (%d and %d bytes), first at %d", filepath.Base(a), filepath.Base(b), len(x), len(y), i)
	}
}
