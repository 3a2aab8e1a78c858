package tests

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lockFixture makes SOURCE with one qcow2 and one raw image.
func lockFixture(t *testing.T) string {
	src := t.TempDir()
	runSteps(t, src, []step{
		create("a.qcow2", "8M", ""),
		createRaw("b.img", "8M"),
	})
	return src
}

// openDisk opens an image's disk file in the mount and closes it when
// the test ends.
func openDisk(t *testing.T, mnt, name string, flag int) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(mnt, name, "disk"), flag, 0)
	if err != nil {
		t.Fatalf("open %s/disk: %v", name, err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// wantLockFailure checks that a QEMU tool failed on QEMU's lock message.
func wantLockFailure(t *testing.T, r result, msg string) {
	t.Helper()
	if r.code == 0 || !strings.Contains(r.stderr, msg) {
		t.Errorf("exit %d, stderr %q; want a failure saying %q", r.code, r.stderr, msg)
	}
}

// afterRelease runs a QEMU tool until it succeeds: the kernel tells the
// mount about a closed file only after close(2) returned.
func afterRelease(t *testing.T, dir, prog string, args ...string) {
	t.Helper()
	var r result
	for try := 0; try < 100; try++ {
		if r = run(t, dir, prog, args...); r.code == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("%s %q after closing disk: exit %d: %s", filepath.Base(prog), args, r.code, r.stderr)
}

// waitLockByte waits until some process holds a lock on byte off of
// file, as /proc/locks shows ("1: OFDLCK ADVISORY READ -1 08:01:1234 201 201").
func waitLockByte(t *testing.T, file string, off int) {
	t.Helper()
	waitLockByteOf(t, file, off, nil)
}

// waitLockByteOf is waitLockByte while holder runs: a holder that exits
// fails the test at once with its output. Starting qemu-io takes seconds
// on a loaded machine, so the wait is long.
func waitLockByteOf(t *testing.T, file string, off int, holder *exec.Cmd) {
	t.Helper()
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	ino := ":" + strconv.FormatUint(st.Sys().(*syscall.Stat_t).Ino, 10)
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); {
		locks, _ := os.ReadFile("/proc/locks")
		for _, line := range strings.Split(string(locks), "\n") {
			f := strings.Fields(line)
			// The kernel merges neighbouring locks: "100 101" is one.
			if len(f) >= 8 && strings.HasSuffix(f[5], ino) && lockCovers(f[6], f[7], off) {
				return
			}
		}
		if holder != nil && holder.ProcessState != nil {
			t.Fatalf("%s exited before locking %s: %v", holder.Path, file, holder.ProcessState)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nobody locked byte %d of %s", off, file)
}

// lockCovers reports whether the /proc/locks range start..end covers
// byte off.
func lockCovers(start, end string, off int) bool {
	a, err := strconv.Atoi(start)
	if err != nil || a > off {
		return false
	}
	b, err := strconv.Atoi(end)
	return end == "EOF" || err == nil && off <= b
}

// holdImage starts qemu-io holding file (in dir) open for writing, as a
// running VM does, and returns once it holds QEMU's write lock (byte
// 101, RAW_LOCK_PERM_BASE + BLK_PERM_WRITE). It is killed when the test
// ends.
func holdImage(t *testing.T, dir, format, file string) {
	t.Helper()
	cmd := exec.Command(qemuIOPath, "-f", format, "-c", "sleep 600000", file)
	cmd.Dir = dir
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	waitLockByteOf(t, filepath.Join(dir, file), 101, cmd)
	select {
	case <-exited:
		t.Fatalf("qemu-io exited: %s", out.String())
	default:
	}
}

// TestFUSELocks checks that the mount takes QEMU's locks as qemu-img
// would for the same use: read locks while disk is only read, the write
// lock only while it is open for writing.
func TestFUSELocks(t *testing.T) {
	requireFUSE(t)
	src := lockFixture(t)
	mnt := mountImgfs(t, src)

	t.Run("reader", func(t *testing.T) {
		r := openDisk(t, mnt, "a.qcow2", os.O_RDONLY)
		if _, err := r.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		// Readers without -U share reading with ours.
		mustRun(t, src, qemuImg, "info", "a.qcow2")
		mustRun(t, src, qemuImg, "convert", "-O", "raw", "a.qcow2", filepath.Join(t.TempDir(), "out.raw"))
		// A qcow2 reader does not let others write, in QEMU as here.
		wantLockFailure(t, run(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 1 0 4k", "a.qcow2"), `Failed to get "write" lock`)
		// A raw one does.
		rb := openDisk(t, mnt, "b.img", os.O_RDONLY)
		if _, err := rb.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		mustRun(t, src, qemuIOPath, "-f", "raw", "-c", "write -P 1 0 4k", "b.img")
		rb.Close()
		afterRelease(t, src, qemuImg, "info", "b.img")

		// A writer reopens the image read-write under the reader.
		w := openDisk(t, mnt, "a.qcow2", os.O_WRONLY)
		data := bytes.Repeat([]byte{0x5a}, 4096)
		if _, err := w.WriteAt(data, 2<<20); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if _, err := r.ReadAt(got, 2<<20); err != nil || !bytes.Equal(got, data) {
			t.Errorf("the reader read %x..., %v after the reopen; want the written %x...", got[:4], err, data[:4])
		}
		wantLockFailure(t, run(t, src, qemuImg, "info", "a.qcow2"), `Failed to get shared "write" lock`)
		w.Close()
		r.Close()
		// The last close lets go of every lock.
		afterRelease(t, src, qemuImg, "info", "a.qcow2")
	})

	t.Run("writer", func(t *testing.T) {
		w := openDisk(t, mnt, "a.qcow2", os.O_RDWR)
		wantLockFailure(t, run(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 1 0 4k", "a.qcow2"), `Failed to get "write" lock`)
		w.Close()
		afterRelease(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 1 0 4k", "a.qcow2")
	})

	t.Run("reopen refused", func(t *testing.T) {
		// A QEMU reader denies writing: a writer in the mount cannot
		// reopen the image read-write, and the mount's reader goes on.
		cmd := exec.Command(qemuIOPath, "-r", "-f", "qcow2", "-c", "sleep 600000", "a.qcow2")
		cmd.Dir = src
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		// Probing with a writer could make the reader fail to start;
		// the lock on byte 201 ("no one else writes") shows it is up.
		waitLockByte(t, filepath.Join(src, "a.qcow2"), 201)
		r := openDisk(t, mnt, "a.qcow2", os.O_RDONLY)
		if _, err := r.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		if f, err := os.OpenFile(filepath.Join(mnt, "a.qcow2", "disk"), os.O_WRONLY, 0); !errors.Is(err, syscall.EBUSY) {
			if err == nil {
				f.Close()
			}
			t.Errorf("open disk for writing under a QEMU reader: %v, want EBUSY", err)
		}
		if _, err := r.ReadAt(make([]byte, 4096), 3<<20); err != nil {
			t.Errorf("reading after the refused reopen: %v", err)
		}
		r.Close()
	})

	t.Run("vm", func(t *testing.T) {
		// The mount lets go of a.qcow2, which the last subtest read,
		// after close(2) returned: a VM could not start before.
		afterRelease(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 1 0 4k", "a.qcow2")
		// qemu-io stands for a VM writing the images.
		holdImage(t, src, "qcow2", "a.qcow2")
		holdImage(t, src, "raw", "b.img")
		// Our qcow2 reader denies writing, as qemu-img's does: it cannot
		// have the image a writer has. A raw reader shares everything.
		for _, c := range []struct {
			file string
			flag int
			want error
		}{
			{"a.qcow2", os.O_RDONLY, syscall.EBUSY},
			{"a.qcow2", os.O_RDWR, syscall.EBUSY},
			{"b.img", os.O_RDONLY, nil},
		} {
			f, err := os.OpenFile(filepath.Join(mnt, c.file, "disk"), c.flag, 0)
			if err == nil {
				_, err = f.ReadAt(make([]byte, 512), 0)
				f.Close()
			}
			if !errors.Is(err, c.want) {
				t.Errorf("open %s/disk flags %#x: %v, want %v", c.file, c.flag, err, c.want)
			}
		}
	})
}
