package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFUSEMmap maps disk, which the kernel otherwise reads and writes
// with direct I/O: a shared mapping sees what reads see, and bytes stored
// through it reach the image (qemu-img reads them after the unmount) and
// later reads of disk. Without CAP_DIRECT_IO_ALLOW_MMAP the kernel refuses
// to map a direct I/O file.
func TestFUSEMmap(t *testing.T) {
	requireFUSE(t)
	src := fuseFixture(t)
	mnt := mountImgfs(t, src)
	disk := filepath.Join(mnt, "a.qcow2", "disk")
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const length = 2 << 20 // the 0xab megabyte at 1M and what follows
	m, err := unix.Mmap(int(f.Fd()), 0, length, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap %s: %v", disk, err)
	}
	want := make([]byte, length)
	if _, err := f.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m, want) || m[1<<20] != 0xab {
		t.Errorf("the mapping of %s differs from what read(2) returns", disk)
	}
	mark := []byte("written through a shared mapping")
	copy(m[3<<19:], mark) // 1.5 MiB, inside the 0xab megabyte
	if err := unix.Msync(m, unix.MS_SYNC); err != nil {
		t.Fatal(err)
	}
	if err := unix.Munmap(m); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(mark))
	if _, err := f.ReadAt(got, 3<<19); err != nil || !bytes.Equal(got, mark) {
		t.Errorf("read after msync: %q, %v; want %q", got, err, mark)
	}
	f.Close()
	umountImgfs(t, mnt)
	copy(want[3<<19:], mark)
	if raw := convertRaw(t, src, "a.qcow2"); !bytes.Equal(raw[:length], want) {
		t.Errorf("qemu-img does not read the bytes stored through the mapping")
	}
	mustRun(t, src, qemuImg, "check", "a.qcow2")
}
