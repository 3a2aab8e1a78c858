package luks

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestResizeMatchesQEMU resizes copies of one image with qemu-img resize
// and with control.Resize: a refusal must carry qemu-img's message and
// leave the file alone, and a resize must leave the two host files byte
// for byte the same, with the same virtual size in qemu-img info (and
// our info of it as qemu-img's), and our image must read exactly as
// qemu-img reads it, grown range (noise
// in QEMU too) and partial last sector included.
func TestResizeMatchesQEMU(t *testing.T) {
	needQEMU(t)
	const size = 1 << 20
	base := newImage(t, "", size)
	// Data everywhere, so a shrink visibly cuts it and the last sector
	// before a grow holds some.
	run(t, "qemu-io", "--object", secretObj, "--image-opts", imageOpts(base),
		"-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 1000 3000", "-c", "write -P 0x44 1048000 576")
	orig, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		size     string // the operand of qemu-img resize
		prealloc string
		shrink   bool
		// wantErr is qemu-img's first line of stderr for a refusal.
		wantErr string
	}{
		{size: "+1M"},
		{size: "+1000"},
		{size: "1048577"},
		{size: "+1M", prealloc: "falloc"},
		{size: "+1M", prealloc: "full"},
		{size: "+700", prealloc: "full"},
		{size: "-512K", shrink: true},
		{size: "-100", shrink: true},
		{size: "1", shrink: true},
		{size: "1M"},
		{size: "-512K", wantErr: "Use the --shrink option to perform a shrink operation."},
		{size: "+1M", prealloc: "metadata", wantErr: "Unsupported preallocation mode: metadata"},
		{size: "-512K", prealloc: "falloc", shrink: true, wantErr: "Preallocation can only be used for growing images"},
		{size: "-1M", shrink: true, wantErr: "New image size must be positive"},
	}
	for _, tc := range tests {
		name := tc.size
		if tc.prealloc != "" {
			// Not a comma: the name goes into the temporary directory,
			// and a comma would split the --image-opts.
			name += " " + tc.prealloc
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			q, o := filepath.Join(dir, "q.luks"), filepath.Join(dir, "o.luks")
			for _, f := range []string{q, o} {
				if err := os.WriteFile(f, orig, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			qemuErr := qemuResize(t, q, tc.size, tc.prealloc, tc.shrink)
			ourErr := ourResize(t, o, tc.size, tc.prealloc, tc.shrink)
			if tc.wantErr != "" {
				if qemuErr != tc.wantErr {
					t.Fatalf("qemu-img: %q, want %q", qemuErr, tc.wantErr)
				}
				if ourErr == nil || ourErr.Error() != tc.wantErr {
					t.Fatalf("control.Resize: %v, want %q", ourErr, tc.wantErr)
				}
				formatstest.SameFiles(t, o, base)
				return
			}
			if qemuErr != "" || ourErr != nil {
				t.Fatalf("qemu-img: %q; control.Resize: %v", qemuErr, ourErr)
			}
			formatstest.SameFiles(t, q, o)
			want := formatstest.QemuVirtualSize(t, "luks", q)
			if got := formatstest.QemuVirtualSize(t, "luks", o); got != want {
				t.Errorf("qemu-img info: virtual size %d after our resize, %d after qemu-img's", got, want)
			}
			if out := run(t, "qemu-img", "compare", "--object", secretObj, "--image-opts", imageOpts(q), imageOpts(o)); out != "Images are identical.\n" {
				t.Errorf("qemu-img compare: %s", out)
			}
			checkInfo(t, o)
			img := openLUKS(t, o, true)
			defer img.Close()
			if got := img.Size(); got != want {
				t.Errorf("Size() = %d, qemu-img info says %d", got, want)
			}
			raw := filepath.Join(dir, "o.raw")
			run(t, "qemu-img", "convert", "--object", secretObj, "--image-opts", imageOpts(o), "-O", "raw", raw)
			qemuData, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, img); !bytes.Equal(got, qemuData) {
				t.Errorf("our read differs from qemu-img convert at byte %d (%d, %d bytes)", formatstest.FirstDiff(got, qemuData), len(got), len(qemuData))
			}
		})
	}
}

// qemuResize runs qemu-img resize on a LUKS image and returns the first
// line of its message, "" on success.
func qemuResize(t *testing.T, name, size, prealloc string, shrink bool) string {
	t.Helper()
	args := []string{"resize", "-q", "--object", secretObj}
	if prealloc != "" {
		args = append(args, "--preallocation="+prealloc)
	}
	if shrink {
		args = append(args, "--shrink")
	}
	args = append(args, "--image-opts", imageOpts(name), "--", size)
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	var exit *exec.ExitError
	if err == nil {
		return ""
	}
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimPrefix(first, "qemu-img: ")
}

// ourResize is qemu-img resize through control.Resize.
func ourResize(t *testing.T, name, size, prealloc string, shrink bool) error {
	t.Helper()
	s, err := control.ParseResizeSize(size)
	if err != nil {
		t.Fatalf("size %q: %v", size, err)
	}
	img, err := formats.Open(name, formats.OpenOptions{Format: "luks", Resize: true, Secrets: secrets, KeySecret: "sec0"})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return control.Resize(control.ResizeOptions{Image: img, Size: s, Prealloc: prealloc, Shrink: shrink})
}
