package parallels

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// fileUse is a file's size and allocation (st_blocks).
type fileUse struct{ size, blocks int64 }

func statUse(t *testing.T, name string) fileUse {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(name, &st); err != nil {
		t.Fatal(err)
	}
	return fileUse{st.Size, st.Blocks}
}

// sameUse compares file sizes exactly and allocations up to the file
// system's own metadata: ext4 counts extent tree blocks in st_blocks, and
// how many it needs depends on where it placed the data, not on what
// was written. A cluster preallocated or zeroed differently is 2048
// sectors or more.
func sameUse(a, b fileUse) bool {
	return a.size == b.size && max(a.blocks-b.blocks, b.blocks-a.blocks) <= 64
}

// qemuIOSession drives an interactive qemu-io, so that the image file
// can be looked at between its writes while qemu-io has it open.
type qemuIOSession struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startQemuIO(t *testing.T, imageOpts string) *qemuIOSession {
	t.Helper()
	cmd := exec.Command("qemu-io", "--image-opts", imageOpts)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &qemuIOSession{cmd: cmd, in: in, out: bufio.NewReader(out)}
	t.Cleanup(func() { s.cmd.Process.Kill(); s.cmd.Wait() })
	return s
}

// write runs "write -P 0x5a OFF LEN" and waits for qemu-io's two report lines.
func (s *qemuIOSession) write(t *testing.T, off, n int64) {
	t.Helper()
	fmt.Fprintf(s.in, "write -P 0x5a %d %d\n", off, n)
	line, err := s.out.ReadString('\n')
	if err != nil || !strings.Contains(line, "wrote") {
		t.Fatalf("qemu-io write: %q %v", line, err)
	}
	if _, err := s.out.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
}

func (s *qemuIOSession) quit(t *testing.T) {
	t.Helper()
	fmt.Fprintln(s.in, "quit")
	s.in.Close()
	if err := s.cmd.Wait(); err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
}

// preallocWrites are the writes the prealloc tests make. The last ones
// allocate runs of several clusters, around one that is allocated
// already.
var preallocWrites = []struct{ off, n int64 }{
	{0, 64 << 10}, {2 << 20, 64 << 10}, {5 << 20, 4 << 10}, {0, 4 << 10}, {9 << 20, 1 << 20},
	{12<<20 + 4096, 4 << 20}, {16 << 20, 3 << 20}, {19<<20 - 4096, 8192}, {21 << 20, 2 << 20}, {2 << 20, 3 << 20},
}

// TestPreallocMatchesQemuIO writes to a new image through qemu-io and
// through imgfs with the same prealloc-mode and prealloc-size, and
// requires the same file size and allocation after each write (while the
// image is open) and after closing it.
func TestPreallocMatchesQemuIO(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range []string{
		"",
		"prealloc-mode=falloc",
		"prealloc-mode=truncate",
		"prealloc-size=3M",
		"prealloc-size=1k", // less than a cluster: one cluster
		"prealloc-size=0,prealloc-mode=truncate",
		"prealloc-mode=truncate,prealloc-size=1500k", // not whole clusters
	} {
		// Commas in the test's directory would split --image-opts.
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			comparePrealloc(t, t.TempDir(), opts, true)
		})
	}
}

// TestPreallocWithoutZeroRange: on tmpfs, which cannot fallocate
// FALLOC_FL_ZERO_RANGE, the file still grows as with QEMU (which falls
// back to other ways of allocating; imgfs grows it sparse, so only the
// sizes are compared).
func TestPreallocWithoutZeroRange(t *testing.T) {
	formatstest.RequireQemu(t)
	var fs syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &fs); err != nil || fs.Type != 0x01021994 { // TMPFS_MAGIC
		t.Fatalf("/dev/shm is not a tmpfs (%v), which this test needs", err)
	}
	for _, opts := range []string{"", "prealloc-size=1k"} {
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			dir, err := os.MkdirTemp("/dev/shm", "imgfs-parallels-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			comparePrealloc(t, dir, opts, false)
		})
	}
}

// comparePrealloc makes the preallocWrites to two new images in dir with
// runtime options opts, one through qemu-io and one through imgfs, and
// compares the files as it goes; allocation too when withBlocks.
func comparePrealloc(t *testing.T, dir, opts string, withBlocks bool) {
	t.Helper()
	ref, ours := filepath.Join(dir, "ref.hds"), filepath.Join(dir, "ours.hds")
	for _, name := range []string{ref, ours} {
		formatstest.Exec(t, "qemu-img", "create", "-q", "-f", format, name, "1G")
	}
	runtime := map[string]string{}
	imageOpts := "driver=parallels,file.filename=" + ref
	if opts != "" {
		imageOpts += "," + opts
		for _, kv := range strings.Split(opts, ",") {
			k, v, _ := strings.Cut(kv, "=")
			runtime[k] = v
		}
	}
	same := func(when string) {
		t.Helper()
		want, got := statUse(t, ref), statUse(t, ours)
		if !withBlocks {
			want.blocks, got.blocks = 0, 0
		}
		if !sameUse(want, got) {
			t.Fatalf("%s: qemu-io's file %+v, ours %+v", when, want, got)
		}
	}
	q := startQemuIO(t, imageOpts)
	img := formatstest.Open(t, ours, formats.OpenOptions{Format: format, Runtime: runtime})
	for _, w := range preallocWrites {
		q.write(t, w.off, w.n)
		if _, err := img.WriteAt(bytes.Repeat([]byte{0x5a}, int(w.n)), w.off); err != nil {
			t.Fatal(err)
		}
		same(fmt.Sprintf("after writing %d bytes at %d", w.n, w.off))
	}
	q.quit(t)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	same("after close")
	formatstest.SameFiles(t, ref, ours)
}

// TestRuntimeOptionErrors compares the refusal of bad runtime options
// with qemu-img's.
func TestRuntimeOptionErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	name := filepath.Join(t.TempDir(), "img.hds")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", format, name, "8M")
	for _, opts := range []map[string]string{
		{"prealloc-mode": "x"},
		{"prealloc-mode": "FALLOC"},
		{"prealloc-size": "x"},
		{"prealloc-size": "-1"},
		{"prealloc-size": "x", "prealloc-mode": "x"},
		{"prealloc-mode": "x", "foo": "1"},
		{"foo": "1"},
	} {
		var list []string
		for k, v := range opts {
			list = append(list, k+"="+v)
		}
		imageOpts := "driver=parallels," + strings.Join(list, ",") + ",file.filename=" + name
		out, err := exec.Command("qemu-img", "info", "-U", "--image-opts", imageOpts).CombinedOutput()
		if err == nil {
			t.Fatalf("qemu-img accepts %s", imageOpts)
		}
		_, ours := formatstest.OpenRetry(name, formats.OpenOptions{Format: format, ReadOnly: true, Runtime: opts})
		if ours == nil {
			t.Fatalf("we accept %v", opts)
		}
		if want := fmt.Sprintf("qemu-img: Could not open '%s': %v\n", imageOpts, ours); string(out) != want {
			t.Errorf("qemu-img says\n%s ours\n%s", out, want)
		}
	}
	// A good value opens.
	img := formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true,
		Runtime: map[string]string{"prealloc-mode": "truncate", "prealloc-size": "1M"}})
	img.Close()
	if _, err := os.Stat(name); err != nil {
		t.Fatal(err)
	}
}
