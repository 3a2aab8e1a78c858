package tests

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFUSECtlErrno holds the errno of each kind of failed ctl command to
// the table the mount documents: EINVAL for a bad argument or option,
// ENOENT for a missing snapshot or file, EOPNOTSUPP for what the format
// cannot do, EROFS for an image the mount keeps read-only, EBUSY for an
// image in use, EACCES for a path outside SOURCE, ENOSPC for a header
// without room. Each failure leaves qemu-img's message in status.
func TestFUSECtlErrno(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	runSteps(t, src, []step{
		create("a.qcow2", "16M", ""),
		qemuIO("qcow2", "a.qcow2", "write -P 0xab 1M 1M"),
		create("base.qcow2", "8M", ""),
		overlay("top.qcow2", "base.qcow2", "qcow2", ""),
		createRaw("r.img", "1M"),
		createFormat("vmdk", "v.vmdk", "1M", ""),
		create("busy.qcow2", "1M", ""),
		// A 512-byte header cluster: no room for a long backing name.
		create("small.qcow2", "1M", "cluster_size=512"),
		// Growing it to 1 PiB would need a 128 GiB bitmap in memory.
		create("bm.qcow2", "4M", ""),
		qemuImgStep("bitmap", "--add", "-g", "1k", "bm.qcow2", "b0"),
	})
	mnt := mountImgfs(t, src)
	// qemu-io stands for a VM that has busy.qcow2 open for writing.
	holdImage(t, src, "qcow2", "busy.qcow2")

	for _, tc := range []struct {
		image, line, msg string
		want             unix.Errno
	}{
		{"a.qcow2", "resize 0", "New image size must be positive", unix.EINVAL},
		{"a.qcow2", "resize -1G", "New image size must be positive", unix.EINVAL},
		{"a.qcow2", "resize -8M", "--shrink", unix.EINVAL},
		{"a.qcow2", "resize 1X", "invalid size", unix.EINVAL},
		{"a.qcow2", "resize --preallocation full 8M", "Preallocation can only be used for growing images", unix.EINVAL},
		{"a.qcow2", "frobnicate now", "unknown command", unix.EINVAL},
		{"a.qcow2", "amend -o nosuch=1", "nosuch", unix.EINVAL},
		{"a.qcow2", "convert -O nosuchfmt out.x", "Unknown file format 'nosuchfmt'", unix.EINVAL},
		{"a.qcow2", "commit", "Image does not have a backing file", unix.EINVAL},
		{"top.qcow2", "commit -b nosuch.qcow2", "Did not find 'nosuch.qcow2' in the backing chain", unix.EINVAL},
		{"a.qcow2", "snapshot -d nosuch", "snapshot not found", unix.ENOENT},
		{"a.qcow2", "snapshot -a nosuch", "Could not apply snapshot 'nosuch'", unix.ENOENT},
		{"top.qcow2", "rebase -b nosuch.qcow2 -F qcow2", "nosuch.qcow2", unix.ENOENT},
		{"r.img", "snapshot -c s0", "Could not create snapshot 's0'", unix.EOPNOTSUPP},
		{"r.img", "amend -o size=2M", "does not support option amendment", unix.EOPNOTSUPP},
		{"r.img", "check -r all", "does not support checks", unix.EOPNOTSUPP},
		{"v.vmdk", "resize 2M", "does not support resize", unix.EOPNOTSUPP},
		{"a.qcow2", "convert -c -O raw out.raw", "Compression not supported for this file format", unix.EOPNOTSUPP},
		{"base.qcow2", "resize +1M", "read-only", unix.EROFS},
		{"busy.qcow2", "resize +1M", "lock", unix.EBUSY},
		{"a.qcow2", "convert -O raw ../../escape.raw", "outside", unix.EACCES},
		{"bm.qcow2", "resize 1P", "too much space would be occupied by the bitmap", unix.EINVAL},
		{"small.qcow2", "rebase -u -F qcow2 -b " + strings.Repeat("./", 200) + "a.qcow2", "No space left in the file header", unix.ENOSPC},
	} {
		dir := filepath.Join(mnt, tc.image)
		if err := writeCtl(t, dir, tc.line); !errors.Is(err, tc.want) {
			t.Errorf("%s: ctl %q: %v, want %v", tc.image, tc.line, err, tc.want)
		}
		op := strings.Fields(tc.line)[0]
		if s := readStatus(t, dir); s.Operation != op || s.State != "failed" || !strings.Contains(s.Error, tc.msg) {
			t.Errorf("%s: ctl %q: status %+v, want %s failed with %q", tc.image, tc.line, s, op, tc.msg)
		}
	}

	// Committing into a backing image whose disk is open, or out of an
	// image whose disk is open, is EBUSY; it works once both are closed.
	for _, open := range []string{"base.qcow2", "top.qcow2"} {
		f, err := os.Open(filepath.Join(mnt, open, "disk"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.ReadAt(make([]byte, 512), 0); err != nil {
			t.Fatal(err)
		}
		if err := writeCtl(t, filepath.Join(mnt, "top.qcow2"), "commit"); !errors.Is(err, unix.EBUSY) {
			t.Errorf("commit with %s/disk open: %v, want EBUSY", open, err)
		}
		f.Close()
	}
	var err error
	for try := 0; try < 100; try++ {
		// The kernel tells the mount about a close after close(2).
		if err = writeCtl(t, filepath.Join(mnt, "top.qcow2"), "commit"); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("commit with both disks closed: %v", err)
	}

	// Snapshot files: an existing name, one that does not exist.
	snaps := filepath.Join(mnt, "a.qcow2", "snapshots")
	mustCtl(t, filepath.Join(mnt, "a.qcow2"), "snapshot -c s0")
	if _, err := os.OpenFile(filepath.Join(snaps, "s0"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); !errors.Is(err, unix.EEXIST) {
		t.Errorf("creating snapshots/s0 again: %v, want EEXIST", err)
	}
	if err := os.Remove(filepath.Join(snaps, "nosuch")); !errors.Is(err, unix.ENOENT) {
		t.Errorf("unlinking a missing snapshot: %v, want ENOENT", err)
	}
	if _, err := os.Create(filepath.Join(mnt, "busy.qcow2", "snapshots", "s1")); !errors.Is(err, unix.EBUSY) {
		t.Errorf("snapshot of an image a VM writes: %v, want EBUSY", err)
	}
}
