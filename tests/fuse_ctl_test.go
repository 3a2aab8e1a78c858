package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// ctlStatus is what an image directory's status file holds.
type ctlStatus struct {
	Operation string  `json:"operation"`
	State     string  `json:"state"`
	Progress  float64 `json:"progress"`
	Error     string  `json:"error"`
}

// writeCtl writes one command line to the ctl file of the image
// directory dir and returns the write's error.
func writeCtl(t *testing.T, dir, line string) error {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "ctl"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatalf("open ctl: %v", err)
	}
	defer f.Close()
	_, err = f.Write([]byte(line + "\n"))
	return err
}

// writeCtlErr is writeCtl for a goroutine: every failure is returned.
func writeCtlErr(ctl, line string) error {
	f, err := os.OpenFile(ctl, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Write([]byte(line + "\n"))
	return err
}

func mustCtl(t *testing.T, dir, line string) {
	t.Helper()
	if err := writeCtl(t, dir, line); err != nil {
		t.Fatalf("ctl %q: %v (status %+v)", line, err, readStatus(t, dir))
	}
}

func readStatus(t *testing.T, dir string) ctlStatus {
	t.Helper()
	name := filepath.Join(dir, "status")
	st, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != int64(len(b)) {
		t.Errorf("status: st_size %d, read %d bytes", st.Size(), len(b))
	}
	var s ctlStatus
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("status %q: %v", b, err)
	}
	return s
}

// snapshotNames lists the internal snapshots qemu-img sees.
func snapshotNames(t *testing.T, src, file string) []string {
	t.Helper()
	out := mustRun(t, src, qemuImg, "snapshot", "-U", "-l", file).stdout
	var names []string
	for i, line := range strings.Split(out, "\n") {
		// "Snapshot list:", the header, then ID, TAG, ...
		if f := strings.Fields(line); i >= 2 && len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return names
}

func has(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func qemuInfo(t *testing.T, src, file string) map[string]any {
	t.Helper()
	var m map[string]any
	out := mustRun(t, src, qemuImg, "info", "-U", "--output=json", file).stdout
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func qemuCheckClean(t *testing.T, src, file string) {
	t.Helper()
	if r := run(t, src, qemuImg, "check", "-U", file); r.code != 0 {
		t.Errorf("qemu-img check %s: exit %d\n%s%s", file, r.code, r.stdout, r.stderr)
	}
}

func TestFUSECtl(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	runSteps(t, src, []step{
		create("a.qcow2", "16M", ""),
		qemuIO("qcow2", "a.qcow2", "write -P 0xab 1M 1M"),
		create("base.qcow2", "8M", ""),
		qemuIO("qcow2", "base.qcow2", "write -P 0x11 0 4M"),
		overlay("top.qcow2", "base.qcow2", "qcow2", ""),
		qemuIO("qcow2", "top.qcow2", "write -P 0x22 1M 1M", "write -z 3M 64k"),
		create("other.qcow2", "8M", ""),
		qemuIO("qcow2", "other.qcow2", "write -P 0x33 0 2M"),
		overlay("mid.qcow2", "other.qcow2", "qcow2", ""),
		qemuIO("qcow2", "mid.qcow2", "write -P 0x44 6M 64k"),
		createRaw("r.img", "1M"),
	})
	mnt := mountImgfs(t, src)
	a := filepath.Join(mnt, "a.qcow2")

	t.Run("resize", func(t *testing.T) {
		// disk stays open across the resize: the kernel's cached size
		// of it must go.
		f, err := os.Open(filepath.Join(a, "disk"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if st, err := f.Stat(); err != nil || st.Size() != 16<<20 {
			t.Fatalf("disk before resize: %v, %v", st, err)
		}
		mustCtl(t, a, "resize +16M")
		if st, err := f.Stat(); err != nil || st.Size() != 32<<20 {
			t.Errorf("fstat of the open disk after resize: %v, %v; want size %d", st, err, 32<<20)
		}
		if got := qemuInfo(t, src, "a.qcow2")["virtual-size"]; got != float64(32<<20) {
			t.Errorf("qemu-img info: virtual-size %v, want %d", got, 32<<20)
		}
		st, err := os.Stat(filepath.Join(a, "disk"))
		if err != nil || st.Size() != 32<<20 {
			t.Errorf("stat disk: %v, %v; want size %d", st, err, 32<<20)
		}
		if s := readStatus(t, a); s.Operation != "resize" || s.State != "done" || s.Progress != 100 {
			t.Errorf("status %+v", s)
		}
		qemuCheckClean(t, src, "a.qcow2")
	})

	t.Run("failures", func(t *testing.T) {
		for _, tc := range []struct {
			line, op, msg string
			want          unix.Errno
		}{
			{"resize -8M", "resize", "--shrink", unix.EINVAL},
			{"resize -1G", "resize", "must be positive", unix.EINVAL},
			{"frobnicate now", "frobnicate", "unknown command", unix.EINVAL},
			{"snapshot -d nosuch", "snapshot", "snapshot not found", unix.ENOENT},
			{"convert -O raw ../../escape.raw", "convert", "outside", unix.EACCES},
			{"commit", "commit", "does not have a backing file", unix.EINVAL},
		} {
			if err := writeCtl(t, a, tc.line); !errors.Is(err, tc.want) {
				t.Errorf("ctl %q: %v, want %v", tc.line, err, tc.want)
			}
			s := readStatus(t, a)
			if s.Operation != tc.op || s.State != "failed" || !strings.Contains(s.Error, tc.msg) {
				t.Errorf("ctl %q: status %+v, want %s failed with %q", tc.line, s, tc.op, tc.msg)
			}
		}
		if _, err := os.ReadFile(filepath.Join(a, "ctl")); !errors.Is(err, unix.EACCES) {
			t.Errorf("reading ctl: %v, want EACCES", err)
		}
	})

	t.Run("snapshots", func(t *testing.T) {
		mustCtl(t, a, "snapshot -c s0")
		if names := snapshotNames(t, src, "a.qcow2"); !has(names, "s0") {
			t.Fatalf("qemu-img snapshot -l: %q, want s0", names)
		}
		// Changed after s0, taken as s1 through the directory.
		disk, err := os.OpenFile(filepath.Join(a, "disk"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer disk.Close()
		if _, err := disk.WriteAt(bytes.Repeat([]byte{0x5a}, 64<<10), 4<<20); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "", "touch", filepath.Join(a, "snapshots", "s1"))
		// touch on an existing snapshot changes nothing.
		mustRun(t, "", "touch", filepath.Join(a, "snapshots", "s1"))
		if names := snapshotNames(t, src, "a.qcow2"); strings.Join(names, " ") != "s0 s1" {
			t.Fatalf("qemu-img snapshot -l: %q, want s0 s1", names)
		}
		if got := readDirNames(t, filepath.Join(a, "snapshots")); strings.Join(got, " ") != "s0 s1" {
			t.Errorf("snapshots/ lists %q", got)
		}
		got, err := os.ReadFile(filepath.Join(a, "snapshots", "s1"))
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "s1.raw")
		mustRun(t, src, qemuImg, "convert", "-U", "-l", "s1", "-O", "raw", "a.qcow2", out)
		want, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) || got[4<<20] != 0x5a {
			t.Errorf("snapshots/s1 differs from qemu-img convert -l s1 (%d, %d bytes)", len(got), len(want))
		}
		if err := os.Rename(filepath.Join(a, "snapshots", "s1"), filepath.Join(a, "snapshots", "s2")); !errors.Is(err, unix.EPERM) {
			t.Errorf("rename: %v, want EPERM", err)
		}

		// Applying s0 through ctl must show in disk, open all along,
		// without stale cached pages.
		buf := make([]byte, 64<<10)
		if _, err := disk.ReadAt(buf, 4<<20); err != nil || buf[0] != 0x5a {
			t.Fatalf("disk before apply: %x, %v", buf[0], err)
		}
		mustCtl(t, a, "snapshot -a s0")
		if _, err := disk.ReadAt(buf, 4<<20); err != nil || !bytes.Equal(buf, make([]byte, len(buf))) {
			t.Errorf("disk after applying s0 still reads %x at 4M, %v", buf[0], err)
		}

		if err := os.Remove(filepath.Join(a, "snapshots", "s1")); err != nil {
			t.Fatal(err)
		}
		disk.Close()
		if names := snapshotNames(t, src, "a.qcow2"); has(names, "s1") || !has(names, "s0") {
			t.Errorf("after unlink, qemu-img snapshot -l: %q", names)
		}
		qemuCheckClean(t, src, "a.qcow2")
	})

	t.Run("no snapshots", func(t *testing.T) {
		dir := filepath.Join(mnt, "r.img", "snapshots")
		st, err := os.Stat(dir)
		if err != nil || st.Mode().Perm() != 0o555 {
			t.Errorf("r.img/snapshots: %v, %v; want mode 0555", st, err)
		}
		if names := readDirNames(t, dir); len(names) != 0 {
			t.Errorf("r.img/snapshots lists %q", names)
		}
		if _, err := os.Create(filepath.Join(dir, "s")); !errors.Is(err, unix.EOPNOTSUPP) {
			t.Errorf("snapshot of a raw image: %v, want EOPNOTSUPP", err)
		}
		if s := readStatus(t, filepath.Join(mnt, "r.img")); s.State != "idle" {
			t.Errorf("status before any operation: %+v", s)
		}
	})

	t.Run("backing", func(t *testing.T) {
		target, err := os.Readlink(filepath.Join(mnt, "top.qcow2", "backing"))
		if err != nil || target != "../base.qcow2" {
			t.Errorf("top.qcow2/backing -> %q, %v", target, err)
		}
		if _, err := os.Stat(filepath.Join(mnt, "top.qcow2", "backing", "disk")); err != nil {
			t.Errorf("backing does not resolve: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(a, "backing")); !errors.Is(err, unix.ENOENT) {
			t.Errorf("a.qcow2/backing: %v, want ENOENT", err)
		}
	})

	t.Run("commit", func(t *testing.T) {
		top := filepath.Join(mnt, "top.qcow2")
		want := convertRaw(t, src, "top.qcow2")
		// Cache base's pages: the commit must drop them.
		baseDisk := filepath.Join(mnt, "base.qcow2", "disk")
		if _, err := os.ReadFile(baseDisk); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(filepath.Join(top, "disk"))
		if err != nil {
			t.Fatal(err)
		}
		if err := writeCtl(t, top, "commit"); !errors.Is(err, unix.EBUSY) {
			t.Errorf("commit with disk open: %v, want EBUSY", err)
		}
		f.Close()
		mustCtl(t, top, "commit")
		if got := convertRaw(t, src, "base.qcow2"); !bytes.Equal(got, want) {
			t.Error("base after commit differs from the old top")
		}
		if got, err := os.ReadFile(baseDisk); err != nil || !bytes.Equal(got, want) {
			t.Errorf("base.qcow2/disk after commit differs from the old top (%v)", err)
		}
		qemuCheckClean(t, src, "base.qcow2")
		qemuCheckClean(t, src, "top.qcow2")
	})

	t.Run("rebase", func(t *testing.T) {
		mid := filepath.Join(mnt, "mid.qcow2")
		want := convertRaw(t, src, "mid.qcow2")
		mustCtl(t, mid, "rebase -b a.qcow2 -F qcow2")
		info := qemuInfo(t, src, "mid.qcow2")
		if info["backing-filename"] != "a.qcow2" {
			t.Errorf("backing after rebase: %v", info["backing-filename"])
		}
		// a.qcow2 is 32M now; the guest keeps mid's 8M view.
		if got := convertRaw(t, src, "mid.qcow2"); !bytes.Equal(got, want) {
			t.Error("mid.qcow2 reads differently after a safe rebase")
		}
		if got, err := os.ReadFile(filepath.Join(mid, "disk")); err != nil || !bytes.Equal(got, want) {
			t.Errorf("mid.qcow2/disk after rebase differs (%v)", err)
		}
		if target, err := os.Readlink(filepath.Join(mid, "backing")); err != nil || target != "../a.qcow2" {
			t.Errorf("mid.qcow2/backing -> %q, %v", target, err)
		}
		qemuCheckClean(t, src, "mid.qcow2")
	})

	t.Run("convert", func(t *testing.T) {
		mid := filepath.Join(mnt, "mid.qcow2")
		if err := os.Mkdir(filepath.Join(src, "out"), 0o755); err != nil {
			t.Fatal(err)
		}
		mustCtl(t, mid, "convert -c -O qcow2 out/mid.qcow2")
		if r := run(t, src, qemuImg, "compare", "-U", "mid.qcow2", "out/mid.qcow2"); r.code != 0 {
			t.Errorf("qemu-img compare: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		qemuCheckClean(t, src, "out/mid.qcow2")
		if s := readStatus(t, mid); s.Operation != "convert" || s.State != "done" || s.Progress != 100 {
			t.Errorf("status %+v", s)
		}
	})

	t.Run("amend-bitmap-check", func(t *testing.T) {
		// other.qcow2 backs nothing since the rebase, so it is writable.
		other := filepath.Join(mnt, "other.qcow2")
		mustCtl(t, other, "amend -o lazy_refcounts=on")
		mustCtl(t, other, "bitmap --add -g 128k b0")
		mustCtl(t, other, "check -r all")
		info := qemuInfo(t, src, "other.qcow2")
		spec, _ := info["format-specific"].(map[string]any)
		data, _ := spec["data"].(map[string]any)
		if data["lazy-refcounts"] != true {
			t.Errorf("lazy-refcounts after amend: %v", data["lazy-refcounts"])
		}
		bitmaps, _ := data["bitmaps"].([]any)
		if len(bitmaps) != 1 || bitmaps[0].(map[string]any)["name"] != "b0" {
			t.Errorf("bitmaps after ctl bitmap --add: %v", data["bitmaps"])
		}
		qemuCheckClean(t, src, "other.qcow2")
		// a.qcow2 backs mid.qcow2 now: read-only in the mount.
		if err := writeCtl(t, a, "resize +1M"); !errors.Is(err, unix.EROFS) {
			t.Errorf("resizing a backing image: %v, want EROFS", err)
		}
	})
}
