package qcow2

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// dirtyOnDisk reads the header's dirty bit from the file.
func dirtyOnDisk(t *testing.T, name string) bool {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[72:])&IncompatDirty != 0
}

// TestLazyRefcountsOption: the lazy-refcounts runtime option overrides
// the header's bit as in QEMU, where a writer that crashes leaves the
// dirty bit set exactly when it used lazy refcounts.
func TestLazyRefcountsOption(t *testing.T) {
	haveQemu(t)
	for _, tc := range []struct {
		create, option string
	}{
		{"lazy_refcounts=off", "on"},
		{"lazy_refcounts=on", "off"},
		{"lazy_refcounts=on", ""},
		{"lazy_refcounts=off", ""},
	} {
		t.Run(tc.create+"/"+tc.option, func(t *testing.T) {
			dir := t.TempDir()
			ref, ours := filepath.Join(dir, "ref.qcow2"), filepath.Join(dir, "ours.qcow2")
			var runtime map[string]string
			imageOpts := "driver=qcow2,file.filename=" + ref
			if tc.option != "" {
				runtime = map[string]string{"lazy-refcounts": tc.option}
				imageOpts += ",lazy-refcounts=" + tc.option
			}
			for _, name := range []string{ref, ours} {
				execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.create, name, "4M")
			}
			// qemu-io's abort crashes it right after the write.
			exec.Command("qemu-io", "--image-opts", imageOpts, "-c", "write -P 1 0 64k", "-c", "abort").Run()
			img, err := formats.Open(ours, formats.OpenOptions{Format: "qcow2", Runtime: runtime})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(make([]byte, 65536), 0); err != nil {
				t.Fatal(err)
			}
			if want, got := dirtyOnDisk(t, ref), dirtyOnDisk(t, ours); want != got {
				t.Errorf("dirty bit after a write: qemu-io %v, ours %v", want, got)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, ours)
		})
	}
}

// TestPassDiscardRequestOption: with pass-discard-request=off a discard
// frees the clusters in the image but leaves them allocated in the file,
// as qemu-io shows.
func TestPassDiscardRequestOption(t *testing.T) {
	haveQemu(t)
	for _, option := range []string{"", "on", "off"} {
		t.Run(option, func(t *testing.T) {
			dir := t.TempDir()
			ref, ours := filepath.Join(dir, "ref.qcow2"), filepath.Join(dir, "ours.qcow2")
			var runtime map[string]string
			imageOpts := "driver=qcow2,file.filename=" + ref
			if option != "" {
				runtime = map[string]string{"pass-discard-request": option}
				imageOpts += ",pass-discard-request=" + option
			}
			for _, name := range []string{ref, ours} {
				execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "8M")
			}
			execOut(t, "qemu-io", "--image-opts", imageOpts, "-c", "write 0 2M", "-c", "discard 0 1M")
			img, err := formats.Open(ours, formats.OpenOptions{Format: "qcow2", Runtime: runtime})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(make([]byte, 2<<20), 0); err != nil {
				t.Fatal(err)
			}
			if err := img.(formats.Discarder).Discard(0, 1<<20); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			// A punched megabyte is 2048 sectors; the file system's own
			// metadata may differ by a few, and our new L2 table is
			// written only where it has entries (storeTable): up to a
			// cluster (128 sectors) less.
			want, got := allocatedSectors(t, ref), allocatedSectors(t, ours)
			if got-want > 64 || want-got > 64+128 {
				t.Errorf("file allocation: qemu-io %d sectors, ours %d", want, got)
			}
		})
	}
}

func allocatedSectors(t *testing.T, name string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(name, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}
