package raw_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// windowOp is one qemu-io request and its imgfs equivalent.
type windowOp struct {
	cmd     string // qemu-io command
	off, n  int64
	pattern byte // write: the byte written; zero, discard: 0
}

func (op windowOp) qemuIO() string {
	switch op.cmd {
	case "write":
		return fmt.Sprintf("write -P %#x %d %d", op.pattern, op.off, op.n)
	case "zero":
		return fmt.Sprintf("write -z %d %d", op.off, op.n)
	}
	return fmt.Sprintf("discard %d %d", op.off, op.n)
}

func (op windowOp) apply(img formats.Image) error {
	switch op.cmd {
	case "write":
		_, err := img.WriteAt(bytes.Repeat([]byte{op.pattern}, int(op.n)), op.off)
		return err
	case "zero":
		return img.(formats.Zeroer).WriteZeroes(op.off, op.n, false)
	}
	return img.(formats.Discarder).Discard(op.off, op.n)
}

// TestWindowMatchesQemuIO applies the same requests through qemu-io and
// through imgfs to a raw image opened with offset and size, and requires
// the same requests to fail, the same files afterwards, and our reads of
// the window to be the file's bytes there.
func TestWindowMatchesQemuIO(t *testing.T) {
	formatstest.RequireQemu(t)
	const fileSize = 8 << 20
	for _, tc := range []struct {
		opts         map[string]string
		offset, size int64
		ops          []windowOp
	}{
		{map[string]string{"offset": "1M", "size": "4M"}, 1 << 20, 4 << 20, []windowOp{
			{"write", 0, 4096, 0x11},
			{"write", 4<<20 - 4096, 4096, 0x22},
			{"write", 4 << 20, 512, 0x23}, // past the window: EIO
			{"write", 4<<20 - 512, 1024, 0x24},
			{"zero", 8192, 8192, 0},
			{"discard", 64 << 10, 64 << 10, 0},
			{"write", 100, 1000, 0x25},
		}},
		{map[string]string{"offset": "7M"}, 7 << 20, 1 << 20, []windowOp{
			{"write", 0, 1 << 20, 0x33},
			{"write", 1 << 20, 512, 0x34},
			{"zero", 4096, 4096, 0},
		}},
		{map[string]string{"offset": "100"}, 100, fileSize, []windowOp{
			{"write", 0, 4096, 0x44},
			{"write", fileSize - 612, 512, 0x45},
			// (QEMU 7.2 aborts on a write to the last sector, which
			// reaches past the end of the file.)
		}},
		{map[string]string{"size": "2M"}, 0, 2 << 20, []windowOp{
			{"write", 0, 512, 0x55},
			{"write", 2 << 20, 512, 0x56},
		}},
	} {
		var list []string
		for k, v := range tc.opts {
			list = append(list, k+"="+v)
		}
		t.Run(strings.Join(list, "+"), func(t *testing.T) {
			dir := t.TempDir()
			ref, ours := filepath.Join(dir, "ref.raw"), filepath.Join(dir, "ours.raw")
			for _, name := range []string{ref, ours} {
				formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", name, "8M")
				formatstest.QemuIO(t, "raw", name, "write -P 0x99 0 8M")
			}
			args := []string{"--image-opts", "driver=raw," + strings.Join(list, ",") + ",file.filename=" + ref}
			for _, op := range tc.ops {
				args = append(args, "-c", op.qemuIO())
			}
			// qemu-io goes on after a failed request and exits 1.
			out, _ := exec.Command("qemu-io", args...).CombinedOutput()

			img := formatstest.Open(t, ours, formats.OpenOptions{Format: "raw", Runtime: tc.opts})
			if img.Size() != tc.size {
				t.Errorf("size %d, want %d", img.Size(), tc.size)
			}
			var ourFailures []string
			for _, op := range tc.ops {
				if err := op.apply(img); err != nil {
					ourFailures = append(ourFailures, op.qemuIO())
				}
			}
			if n := strings.Count(string(out), "failed: "); len(ourFailures) != n {
				t.Errorf("qemu-io failed %d requests:\n%s\nwe failed %q", n, out, ourFailures)
			}
			got := make([]byte, img.Size())
			if _, err := img.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			formatstest.SameFiles(t, ref, ours)
			file, err := os.ReadFile(ours)
			if err != nil {
				t.Fatal(err)
			}
			// Past the end of the file the window reads as zeroes.
			want := make([]byte, tc.size)
			copy(want, file[min(tc.offset, int64(len(file))):])
			if i := formatstest.FirstDiff(want, got); i >= 0 {
				t.Errorf("our read of the window differs from the file at %d", i)
			}
		})
	}
}
