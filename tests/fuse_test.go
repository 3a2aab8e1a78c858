package tests

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The FUSE tests mount for real with the built imgfs: they need root
// and /dev/fuse, which the test machines have (the test command
// installs fuse3).

// imgfsBin is the built binary under its own name (ours is the qemu-img
// symlink to it).
func imgfsBin() string { return filepath.Join(filepath.Dir(ours), "imgfs") }

func requireFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("FUSE tests need root (the test machines run as root)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatal("FUSE tests need /dev/fuse")
	}
}

// mountImgfs mounts src on a new directory with `imgfs mount` and
// unmounts it when the test ends. It returns the mount point.
func mountImgfs(t *testing.T, src string, opts ...string) string {
	t.Helper()
	mnt := t.TempDir()
	args := []string{"mount"}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	// The mount goes on in a daemon whose stderr is /dev/null; a race
	// detector report would be lost there, so it goes to a file.
	raceLog := filepath.Join(t.TempDir(), "race")
	cmd := exec.Command(imgfsBin(), append(args, src, mnt)...)
	cmd.Env = append(os.Environ(), "GORACE="+os.Getenv("GORACE")+" log_path="+raceLog)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("imgfs mount: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		umountImgfs(t, mnt)
		reports, _ := filepath.Glob(raceLog + "*")
		for _, r := range reports {
			b, _ := os.ReadFile(r)
			t.Errorf("the mount process reported:\n%s", b)
		}
	})
	return mnt
}

// umountImgfs unmounts mnt with `imgfs umount`, retrying while the
// kernel still finds it busy (a loop device lets go asynchronously).
// Unmounting what is not mounted is not an error here, so the cleanup
// may run after a test unmounted itself.
func umountImgfs(t *testing.T, mnt string) {
	t.Helper()
	if !isMounted(mnt) {
		return
	}
	var r result
	for try := 0; try < 50; try++ {
		if r = run(t, "", imgfsBin(), "umount", mnt); r.code == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("imgfs umount %s: exit %d: %s", mnt, r.code, r.stderr)
}

func isMounted(dir string) bool {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// fuseFixture makes SOURCE: a qcow2 image written with qemu-io, a raw
// image with data and a text file that is no image.
func fuseFixture(t *testing.T) string {
	src := t.TempDir()
	runSteps(t, src, []step{
		create("a.qcow2", "64M", ""),
		qemuIO("qcow2", "a.qcow2", "write -P 0xab 1M 1M", "write -P 0x11 5M 64k", "write -z 8M 1M"),
		createRaw("b.img", "8M"),
		qemuIO("raw", "b.img", "write -P 0x42 4k 12k"),
	})
	if err := os.WriteFile(filepath.Join(src, "notes.txt"), []byte("not an image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return src
}

func readDirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// convertRaw returns the guest bytes of an image as qemu-img sees them.
func convertRaw(t *testing.T, dir, file string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	// -U: the mount may hold the image open, with QEMU's write lock.
	mustRun(t, dir, qemuImg, "convert", "-U", "-O", "raw", file, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFUSE(t *testing.T) {
	requireFUSE(t)
	src := fuseFixture(t)
	qcow := filepath.Join(src, "a.qcow2")
	// What the command line prints, taken before the mount opens
	// anything (its locks would make the commands fail).
	wantReports := map[string]string{
		"info":      mustRun(t, "", imgfsBin(), "info", qcow).stdout,
		"info.json": mustRun(t, "", imgfsBin(), "info", "--output=json", qcow).stdout,
		"map.json":  mustRun(t, "", imgfsBin(), "map", "--output=json", qcow).stdout,
		"check":     mustRun(t, "", imgfsBin(), "check", qcow).stdout,
	}
	wantDisk := convertRaw(t, src, "a.qcow2")
	mnt := mountImgfs(t, src)
	img := filepath.Join(mnt, "a.qcow2")
	disk := filepath.Join(img, "disk")

	t.Run("listing", func(t *testing.T) {
		if got, want := readDirNames(t, mnt), []string{"a.qcow2", "b.img"}; !slices.Equal(got, want) {
			t.Errorf("mount lists %q, want %q", got, want)
		}
		if got, want := readDirNames(t, img), []string{"check", "convert-to", "ctl", "disk", "info", "info.json", "map.json", "snapshots", "status"}; !slices.Equal(got, want) {
			t.Errorf("image directory lists %q, want %q", got, want)
		}
	})

	t.Run("reports", func(t *testing.T) {
		for name, want := range wantReports {
			st, err := os.Stat(filepath.Join(img, name))
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != int64(len(want)) {
				t.Errorf("%s: st_size %d before reading, the text has %d bytes", name, st.Size(), len(want))
			}
			got, err := os.ReadFile(filepath.Join(img, name))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != want {
				t.Errorf("%s differs from the command's output %s\n--- command:\n%s--- mount:\n%s", name, firstDiff(want, string(got)), want, got)
			}
		}
	})

	t.Run("read", func(t *testing.T) {
		got, err := os.ReadFile(disk)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, wantDisk) {
			t.Errorf("disk differs from qemu-img convert -O raw at byte %d", firstByteDiff(got, wantDisk))
		}
		raw, err := os.ReadFile(filepath.Join(mnt, "b.img", "disk"))
		if err != nil {
			t.Fatal(err)
		}
		if want := convertRaw(t, src, "b.img"); !bytes.Equal(raw, want) {
			t.Errorf("raw disk differs at byte %d", firstByteDiff(raw, want))
		}
	})

	t.Run("seek", func(t *testing.T) {
		f, err := os.Open(disk)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		const m = 1 << 20
		// Data at [1M, 2M) and [5M, 5M+64k); 8M.. is written as zeroes,
		// which is a hole.
		for _, c := range []struct {
			off    int64
			whence int
			want   int64
		}{
			{0, unix.SEEK_DATA, m}, {m, unix.SEEK_HOLE, 2 * m}, {2 * m, unix.SEEK_DATA, 5 * m},
			{5 * m, unix.SEEK_HOLE, 5*m + 64<<10}, {8 * m, unix.SEEK_HOLE, 8 * m}, {0, unix.SEEK_HOLE, 0},
		} {
			got, err := unix.Seek(int(f.Fd()), c.off, c.whence)
			if err != nil || got != c.want {
				t.Errorf("lseek(%d, %d) = %d, %v; want %d", c.off, c.whence, got, err, c.want)
			}
		}
		if _, err := unix.Seek(int(f.Fd()), 6*m, unix.SEEK_DATA); !errors.Is(err, unix.ENXIO) {
			t.Errorf("SEEK_DATA past the last data: %v, want ENXIO", err)
		}
	})

	shadow := slices.Clone(wantDisk)
	t.Run("concurrent writes", func(t *testing.T) {
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// Each writer owns every 8th 64 KiB stripe, so the shadow copy
		// knows what the disk must hold whatever the interleaving.
		const writers, stripe = 8, 64 << 10
		var wg sync.WaitGroup
		errs := make(chan error, writers)
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(w), 7))
				for range 40 {
					s := int64(r.IntN(len(shadow)/stripe/writers))*writers + int64(w)
					off := s*stripe + int64(r.IntN(stripe-1))
					buf := make([]byte, 1+r.IntN(int(s*stripe+stripe-off)-1))
					for i := range buf {
						buf[i] = byte(r.Uint32())
					}
					if _, err := f.WriteAt(buf, off); err != nil {
						errs <- err
						return
					}
					copy(shadow[off:], buf)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(disk)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, shadow) {
			t.Errorf("disk differs from the shadow at byte %d", firstByteDiff(got, shadow))
		}
	})

	t.Run("punch hole", func(t *testing.T) {
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		const off, n = 1 << 20, 128 << 10
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
			t.Fatal(err)
		}
		clear(shadow[off : off+n])
		got := make([]byte, n)
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, n)) {
			t.Error("a punched hole does not read as zeroes")
		}
	})

	t.Run("truncate", func(t *testing.T) {
		const size = 96 << 20
		if err := os.Truncate(disk, size); err != nil {
			t.Fatal(err)
		}
		if st, err := os.Stat(disk); err != nil || st.Size() != size {
			t.Fatalf("after truncate: %v, %v", st, err)
		}
		shadow = append(shadow, make([]byte, size-len(shadow))...)
	})

	t.Run("image appears", func(t *testing.T) {
		mustRun(t, src, qemuImg, "create", "-q", "-f", "qcow2", "c.qcow2", "1M")
		if got := readDirNames(t, mnt); !slices.Contains(got, "c.qcow2") {
			t.Errorf("new image not listed: %q", got)
		}
		if st, err := os.Stat(filepath.Join(mnt, "c.qcow2", "disk")); err != nil || st.Size() != 1<<20 {
			t.Errorf("new image's disk: %v, %v", st, err)
		}
		// Replaced under the same name: the new image is shown.
		os.Remove(filepath.Join(src, "c.qcow2"))
		mustRun(t, src, qemuImg, "create", "-q", "-f", "vdi", "c.qcow2", "2M")
		if st, err := os.Stat(filepath.Join(mnt, "c.qcow2", "disk")); err != nil || st.Size() != 2<<20 {
			t.Errorf("replaced image's disk: %v, %v; want 2 MiB", st, err)
		}
		if info, err := os.ReadFile(filepath.Join(mnt, "c.qcow2", "info")); err != nil || !strings.Contains(string(info), "file format: vdi") {
			t.Errorf("replaced image's info: %q, %v", info, err)
		}
		os.Remove(filepath.Join(src, "c.qcow2"))
		if _, err := os.Stat(filepath.Join(mnt, "c.qcow2")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("removed image still there: %v", err)
		}
		if got := readDirNames(t, mnt); slices.Contains(got, "c.qcow2") {
			t.Errorf("removed image still listed: %q", got)
		}
	})

	umountImgfs(t, mnt)
	mustRun(t, src, qemuImg, "check", "a.qcow2")
	shadowFile := filepath.Join(t.TempDir(), "shadow.raw")
	if err := os.WriteFile(shadowFile, shadow, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := run(t, src, qemuImg, "compare", "-f", "raw", "-F", "qcow2", shadowFile, "a.qcow2"); r.code != 0 {
		t.Errorf("qemu-img compare with the shadow: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if info := mustRun(t, src, qemuImg, "info", "a.qcow2").stdout; !strings.Contains(info, "virtual size: 96 MiB") {
		t.Errorf("qemu-img info after truncate:\n%s", info)
	}
}

// TestFUSERepair reads the check report of a leaking image and repairs
// it by writing "leaks" to check. The file holds what `imgfs check`
// prints, per-cluster messages (its stderr) first.
func TestFUSERepair(t *testing.T) {
	requireFUSE(t)
	src, ref := t.TempDir(), t.TempDir()
	for _, dir := range []string{src, ref} {
		// Cluster 4 gets a refcount but no reference: a leak.
		runSteps(t, dir, []step{create("leak.qcow2", "4M", ""), truncateFile("leak.qcow2", 0x50000),
			patch("leak.qcow2", 0x20000+2*4, 0, 1)})
	}
	want := run(t, ref, imgfsBin(), "check", "leak.qcow2")
	wantRepair := run(t, ref, imgfsBin(), "check", "-r", "leaks", "leak.qcow2")
	if want.code != 3 || wantRepair.code != 0 {
		t.Fatalf("fixture: check exits %d, repair %d; want 3 and 0", want.code, wantRepair.code)
	}
	mnt := mountImgfs(t, src)
	check := filepath.Join(mnt, "leak.qcow2", "check")
	// The reports name the image by its path in SOURCE.
	fix := func(s string) string { return strings.ReplaceAll(s, "leak.qcow2", filepath.Join(src, "leak.qcow2")) }
	for _, step := range []struct {
		write string
		want  result
	}{{"", want}, {"leaks\n", wantRepair}} {
		if step.write != "" {
			if err := os.WriteFile(check, []byte(step.write), 0); err != nil {
				t.Fatal(err)
			}
		}
		got, err := os.ReadFile(check)
		if err != nil {
			t.Fatal(err)
		}
		if w := fix(step.want.stderr + step.want.stdout); string(got) != w {
			t.Errorf("check after %q:\n--- want:\n%s--- got:\n%s", step.write, w, got)
		}
	}
	if err := os.WriteFile(check, []byte("everything\n"), 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("writing an unknown repair: %v, want EINVAL", err)
	}
	umountImgfs(t, mnt)
	mustRun(t, src, qemuImg, "check", "leak.qcow2")
}

func TestFUSEReadOnly(t *testing.T) {
	requireFUSE(t)
	src := fuseFixture(t)
	mustRun(t, src, qemuImg, "snapshot", "-c", "s0", "a.qcow2")
	before := convertRaw(t, src, "a.qcow2")
	mnt := mountImgfs(t, src, "ro")
	dir := filepath.Join(mnt, "a.qcow2")
	disk := filepath.Join(dir, "disk")
	if _, err := os.OpenFile(disk, os.O_RDWR, 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("open for writing on -o ro: %v, want EROFS", err)
	}
	if err := os.Truncate(disk, 1<<30); !errors.Is(err, unix.EROFS) {
		t.Errorf("truncate on -o ro: %v, want EROFS", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "a.qcow2", "check"), []byte("all\n"), 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("repair on -o ro: %v, want EROFS", err)
	}
	if _, err := os.OpenFile(filepath.Join(dir, "ctl"), os.O_WRONLY, 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("opening ctl on -o ro: %v, want EROFS", err)
	}
	if _, err := os.Create(filepath.Join(dir, "snapshots", "s1")); !errors.Is(err, unix.EROFS) {
		t.Errorf("taking a snapshot on -o ro: %v, want EROFS", err)
	}
	if err := os.Remove(filepath.Join(dir, "snapshots", "s0")); !errors.Is(err, unix.EROFS) {
		t.Errorf("deleting a snapshot on -o ro: %v, want EROFS", err)
	}
	if got, err := os.ReadFile(disk); err != nil || !bytes.Equal(got, before) {
		t.Errorf("reading on -o ro: %d bytes, %v", len(got), err)
	}
	if _, err := os.ReadFile(filepath.Join(dir, "snapshots", "s0")); err != nil {
		t.Errorf("reading a snapshot on -o ro: %v", err)
	}
	if _, err := os.ReadFile(filepath.Join(dir, "convert-to", "disk.vmdk")); err != nil {
		t.Errorf("reading convert-to on -o ro: %v", err)
	}
	for _, name := range []string{"a.qcow2", "b.img"} {
		if st, err := os.Stat(filepath.Join(mnt, name, "disk")); err != nil || st.Mode().Perm()&0o222 != 0 {
			t.Errorf("%s/disk on -o ro: %v, %v; want no write permission", name, st, err)
		}
	}
	umountImgfs(t, mnt)
	if names := snapshotNames(t, src, "a.qcow2"); strings.Join(names, " ") != "s0" {
		t.Errorf("snapshots after the -o ro mount: %q", names)
	}
	if got := convertRaw(t, src, "a.qcow2"); !bytes.Equal(got, before) {
		t.Error("the image changed under -o ro")
	}
}

// TestFUSEBacking checks the safety rules: an image that backs another
// is read-only, and a backing file outside SOURCE is refused.
func TestFUSEBacking(t *testing.T) {
	requireFUSE(t)
	src, outside := t.TempDir(), t.TempDir()
	runSteps(t, src, []step{
		create("base.qcow2", "4M", ""),
		overlay("top.qcow2", "base.qcow2", "qcow2", ""),
	})
	runSteps(t, outside, []step{create("far.qcow2", "4M", "")})
	mustRun(t, src, qemuImg, "create", "-q", "-f", "qcow2", "-b", filepath.Join(outside, "far.qcow2"), "-F", "qcow2", "escape.qcow2")
	// A VMDK descriptor in SOURCE whose extent lies outside it.
	mustRun(t, outside, qemuImg, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M")
	desc, err := os.ReadFile(filepath.Join(outside, "flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	desc = bytes.Replace(desc, []byte(`"flat-flat.vmdk"`), []byte(`"`+filepath.Join(outside, "flat-flat.vmdk")+`"`), 1)
	if err := os.WriteFile(filepath.Join(src, "extent.vmdk"), desc, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := mountImgfs(t, src)
	if _, err := os.OpenFile(filepath.Join(mnt, "base.qcow2", "disk"), os.O_RDWR, 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("writing a backing image: %v, want EROFS", err)
	}
	f, err := os.OpenFile(filepath.Join(mnt, "top.qcow2", "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("writing the overlay: %v", err)
	}
	f.Close()
	if _, err := os.Open(filepath.Join(mnt, "escape.qcow2", "disk")); !errors.Is(err, unix.EACCES) {
		t.Errorf("image backed from outside SOURCE: %v, want EACCES", err)
	}
	info, err := os.ReadFile(filepath.Join(mnt, "escape.qcow2", "info"))
	if err != nil || !strings.Contains(string(info), "allow_outside") {
		t.Errorf("info of the refused image: %q, %v", info, err)
	}
	if _, err := os.Open(filepath.Join(mnt, "extent.vmdk", "disk")); !errors.Is(err, unix.EACCES) {
		t.Errorf("image with an extent outside SOURCE: %v, want EACCES", err)
	}
	if info, err := os.ReadFile(filepath.Join(mnt, "extent.vmdk", "info")); err != nil || !strings.Contains(string(info), "extent file") {
		t.Errorf("info of the image with an extent outside: %q, %v", info, err)
	}
}

// TestFUSELoopExt4 puts an ext4 filesystem on disk through a loop
// device, as the inspector does, and checks it survives a remount.
func TestFUSELoopExt4(t *testing.T) {
	requireFUSE(t)
	for _, tool := range []string{"losetup", "mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: run `make test`, which installs it", tool)
		}
	}
	src := t.TempDir()
	runSteps(t, src, []step{create("fs.qcow2", "64M", "")})
	guest := t.TempDir()
	content := []byte(strings.Repeat("imgfs guest file\n", 1000))

	// withGuest mounts the image, attaches disk to a loop device (making
	// the filesystem first when mkfs), mounts the guest filesystem and
	// runs fn, then takes everything down again.
	withGuest := func(mkfs bool, fn func()) {
		mnt := mountImgfs(t, src)
		r := run(t, "", "losetup", "--find", "--show", "-P", filepath.Join(mnt, "fs.qcow2", "disk"))
		if r.code != 0 {
			t.Fatalf("no loop device: %s", r.stderr)
		}
		loop := strings.TrimSpace(r.stdout)
		defer umountImgfs(t, mnt)
		defer mustRun(t, "", "losetup", "-d", loop)
		if mkfs {
			mustRun(t, "", "mkfs.ext4", "-q", loop)
		}
		mustRun(t, "", "mount", loop, guest)
		defer mustRun(t, "", "umount", guest)
		fn()
	}
	withGuest(true, func() {
		if err := os.WriteFile(filepath.Join(guest, "file"), content, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(guest, "dir"), 0o755); err != nil {
			t.Fatal(err)
		}
	})
	mustRun(t, src, qemuImg, "check", "fs.qcow2")
	withGuest(false, func() {
		got, err := os.ReadFile(filepath.Join(guest, "file"))
		if err != nil || !bytes.Equal(got, content) {
			t.Errorf("guest file after remount: %d bytes, %v", len(got), err)
		}
	})
	mustRun(t, src, qemuImg, "check", "fs.qcow2")
}

// TestFUSEDamaged mounts an image whose metadata is broken: it is
// listed, its info says what is wrong, and its disk fails with EIO; the
// other images are served as usual.
func TestFUSEDamaged(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	runSteps(t, src, []step{
		create("good.qcow2", "1M", ""),
		// An L1 table of 0 entries cannot map 4 MiB.
		create("bad.qcow2", "4M", ""), patch("bad.qcow2", 36, 0, 0, 0, 0),
	})
	want := run(t, src, imgfsBin(), "info", filepath.Join(src, "bad.qcow2"))
	if want.code == 0 {
		t.Fatal("fixture: imgfs info accepts the damaged image")
	}
	mnt := mountImgfs(t, src)
	if got := readDirNames(t, mnt); !slices.Equal(got, []string{"bad.qcow2", "good.qcow2"}) {
		t.Errorf("mount lists %q", got)
	}
	info, err := os.ReadFile(filepath.Join(mnt, "bad.qcow2", "info"))
	if err != nil {
		t.Fatal(err)
	}
	// The command prints the same message after its name.
	if w := strings.TrimPrefix(want.stderr, "imgfs: "); string(info) != w {
		t.Errorf("info of the damaged image: %q, want %q", info, w)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "bad.qcow2", "disk")); !errors.Is(err, unix.EIO) {
		t.Errorf("reading the damaged disk: %v, want EIO", err)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "good.qcow2", "disk")); err != nil {
		t.Errorf("the good image next to it: %v", err)
	}
}

// TestFUSESignal stops the mount with SIGTERM, SIGINT and fusermount3
// -u: each unmounts, and the image written through it is left flushed
// and clean.
func TestFUSESignal(t *testing.T) {
	requireFUSE(t)
	for _, stop := range []string{"SIGTERM", "SIGINT", "fusermount3 -u"} {
		t.Run(stop, func(t *testing.T) {
			src := t.TempDir()
			runSteps(t, src, []step{create("a.qcow2", "8M", "")})
			mnt := mountImgfs(t, src)
			data := bytes.Repeat([]byte{0x5a}, 3<<20)
			if err := os.WriteFile(filepath.Join(mnt, "a.qcow2", "disk"), data, 0); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 16)
			n, err := unix.Getxattr(mnt, "user.imgfs.pid", buf)
			if err != nil {
				t.Fatal(err)
			}
			pid, err := strconv.Atoi(string(buf[:n]))
			if err != nil {
				t.Fatal(err)
			}
			switch stop {
			case "SIGTERM":
				err = unix.Kill(pid, unix.SIGTERM)
			case "SIGINT":
				err = unix.Kill(pid, unix.SIGINT)
			default:
				if r := run(t, "", "fusermount3", "-u", mnt); r.code != 0 {
					err = fmt.Errorf("exit %d: %s", r.code, r.stderr)
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(10 * time.Second); isMounted(mnt) || unix.Kill(pid, 0) == nil && !zombie(pid); {
				if time.Now().After(deadline) {
					t.Fatalf("the mount process did not stop on %s", stop)
				}
				time.Sleep(10 * time.Millisecond)
			}
			mustRun(t, src, qemuImg, "check", "a.qcow2")
			got := convertRaw(t, src, "a.qcow2")
			if !bytes.Equal(got[:len(data)], data) {
				t.Errorf("the data written before %s is not in the image", stop)
			}
		})
	}
}

// zombie reports whether pid has exited but is not reaped yet.
func zombie(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

// TestFUSESingleFileHelper mounts one image file the way an fstab line
// of type fuse.imgfs does: mount.fuse3 runs `imgfs SOURCE MOUNTPOINT -o
// OPTIONS` through the shell, finding imgfs on PATH.
func TestFUSESingleFileHelper(t *testing.T) {
	requireFUSE(t)
	helper, err := exec.LookPath("mount.fuse3")
	if err != nil {
		t.Fatal("mount.fuse3 not installed: run `make test`, which installs fuse3")
	}
	src := t.TempDir()
	// A raw image under a name no rule would pick: naming the file is
	// enough.
	runSteps(t, src, []step{createRaw("guest.data", "1M")})
	mnt := t.TempDir()
	cmd := exec.Command(helper, filepath.Join(src, "guest.data"), mnt, "-t", "fuse.imgfs", "-o", "ro,noauto,user")
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(imgfsBin())+":"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mount.fuse3: %v\n%s", err, out)
	}
	t.Cleanup(func() { umountImgfs(t, mnt) })
	if got := readDirNames(t, mnt); !slices.Equal(got, []string{"guest.data"}) {
		t.Errorf("mount lists %q", got)
	}
	if st, err := os.Stat(filepath.Join(mnt, "guest.data", "disk")); err != nil || st.Size() != 1<<20 {
		t.Errorf("disk: %v, %v", st, err)
	}
	if _, err := os.OpenFile(filepath.Join(mnt, "guest.data", "disk"), os.O_RDWR, 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("-o ro through the helper: %v, want EROFS", err)
	}
}
