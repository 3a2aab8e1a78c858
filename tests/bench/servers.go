package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// server is a FUSE export of one qcow2 image: an imgfs mount or a
// qemu-storage-daemon (QSD) export.
type server struct {
	disk string // the file holding the guest-visible bytes
	pid  int    // the serving process
	stop func() error
}

// peakRSS is the serving process's peak resident set so far (VmHWM).
func (s *server) peakRSS() float64 {
	var kb float64
	fmt.Sscanf(procField(fmt.Sprintf("/proc/%d/status", s.pid), "VmHWM"), "%g", &kb)
	return kb * 1024
}

// cpuTime is the user and system CPU time the serving process has used.
func (s *server) cpuTime() float64 {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.pid))
	if err != nil {
		return 0
	}
	// utime and stime are the 12th and 13th fields after the command
	// name, in clock ticks (USER_HZ, 100 on Linux).
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return 0
	}
	var utime, stime float64
	fmt.Sscan(f[11], &utime)
	fmt.Sscan(f[12], &stime)
	return (utime + stime) / 100
}

// serverNames are the sides that serve an image over FUSE.
const (
	sideImgfs = "imgfs"
	sideQSD   = "QSD"
)

// serve exports image through side's FUSE server under dir, read-only
// unless writable.
func serve(ctx context.Context, t *tools, side, image, dir string, writable bool) (*server, error) {
	if side == sideImgfs {
		return mountImgfs(ctx, t, image, filepath.Join(dir, "imgfs-mnt"), writable)
	}
	return startQSD(t, image, filepath.Join(dir, "qsd-export"), writable)
}

// mountImgfs mounts the single image with `imgfs mount`, which returns
// once the mount is ready; the image shows as MNT/<name>/disk.
func mountImgfs(ctx context.Context, t *tools, image, mnt string, writable bool) (*server, error) {
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, err
	}
	args := []string{"mount"}
	if !writable {
		args = append(args, "-o", "ro")
	}
	if err := run(ctx, t.imgfs, append(args, image, mnt)...); err != nil {
		return nil, err
	}
	s := &server{
		disk: filepath.Join(mnt, filepath.Base(image), "disk"),
		// `imgfs umount` waits until the daemon has closed the image.
		stop: func() error { return run(context.Background(), t.imgfs, "umount", mnt) },
	}
	// The mount names its serving process in an extended attribute of
	// its root (what `imgfs umount` waits on).
	buf := make([]byte, 32)
	n, err := unix.Getxattr(mnt, "user.imgfs.pid", buf)
	if err == nil {
		s.pid, err = strconv.Atoi(string(buf[:n]))
	}
	if err != nil {
		s.stop()
		return nil, fmt.Errorf("%s: the serving pid: %w", mnt, err)
	}
	return s, nil
}

// startQSD exports image with qemu-storage-daemon's FUSE export on the
// regular file export and waits until the export is mounted.
func startQSD(t *tools, image, export string, writable bool) (*server, error) {
	if err := os.WriteFile(export, nil, 0o644); err != nil {
		return nil, err
	}
	ro := ",read-only=on"
	w := ""
	if writable {
		ro, w = "", ",writable=on"
	}
	cmd := exec.Command(t.qsd,
		"--blockdev", "driver=file,node-name=f,filename="+image+ro,
		"--blockdev", "driver=qcow2,node-name=q,file=f"+ro,
		"--export", "type=fuse,id=e,node-name=q,mountpoint="+export+w)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	s := &server{disk: export, pid: cmd.Process.Pid}
	s.stop = func() error {
		// SIGTERM makes QSD flush and close its images before it exits.
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("qemu-storage-daemon: %w: %s", err, lastLines(stderr.String(), 5))
			}
			return nil
		case <-time.After(2 * time.Minute):
			cmd.Process.Kill()
			<-exited
			return errors.New("qemu-storage-daemon did not exit within 2 minutes of SIGTERM")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for !mounted(export) {
		select {
		case err := <-exited:
			return nil, fmt.Errorf("qemu-storage-daemon exited before exporting %s: %v: %s", image, err, lastLines(stderr.String(), 5))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("qemu-storage-daemon did not export %s within 30 s", image)
		}
	}
	return s, nil
}

// mountPoints lists the mount points of /proc/self/mountinfo.
func mountPoints() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 {
			mp, err := strconv.Unquote(`"` + fields[4] + `"`)
			if err != nil {
				mp = fields[4]
			}
			mps = append(mps, mp)
		}
	}
	return mps
}

func mounted(path string) bool {
	for _, mp := range mountPoints() {
		if mp == path {
			return true
		}
	}
	return false
}

// attachLoop makes a loop device over file.
func attachLoop(ctx context.Context, file string, writable bool) (string, error) {
	args := []string{"--find", "--show"}
	if !writable {
		args = append(args, "--read-only")
	}
	out, err := exec.CommandContext(ctx, "losetup", append(args, file)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("losetup %s: %w: %s", file, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// detachLoop frees a loop device and waits until it has let go of its
// backing file (losetup -d only asks for that), so that the FUSE mount
// under it can be unmounted.
func detachLoop(dev string) error {
	if err := run(context.Background(), "losetup", "-d", dev); err != nil {
		return err
	}
	backing := filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file")
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(backing); errors.Is(err, os.ErrNotExist) {
			return nil
		}
	}
	return fmt.Errorf("%s still holds its backing file 30 s after losetup -d", dev)
}

// guest is an ext4 filesystem mounted from a loop device over a file.
type guest struct {
	dev, dir string
}

// mountGuest loop-mounts the ext4 filesystem in file on dir.
func mountGuest(ctx context.Context, file, dir string, writable bool) (*guest, error) {
	dev, err := attachLoop(ctx, file, writable)
	if err != nil {
		return nil, err
	}
	g := &guest{dev: dev, dir: dir}
	if err := g.mount(ctx, writable); err != nil {
		detachLoop(dev)
		return nil, err
	}
	return g, nil
}

func (g *guest) mount(ctx context.Context, writable bool) error {
	if err := os.MkdirAll(g.dir, 0o755); err != nil {
		return err
	}
	opts := "ro"
	if writable {
		opts = "rw"
	}
	return run(ctx, "mount", "-t", "ext4", "-o", opts, g.dev, g.dir)
}

// close unmounts the filesystem (if mounted) and frees the loop device.
func (g *guest) close() error {
	var errs []error
	if mounted(g.dir) {
		errs = append(errs, run(context.Background(), "umount", g.dir))
	}
	errs = append(errs, detachLoop(g.dev))
	return errors.Join(errs...)
}

// cleanStale undoes what a bench killed midway left under dir: loop
// devices over its files, then its mounts (deepest first).
func cleanStale(dir string) {
	prefix := strings.TrimSuffix(dir, "/") + "/"
	out, _ := exec.Command("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && strings.HasPrefix(f[1], prefix) {
			fmt.Fprintf(os.Stderr, "bench: detaching stale %s (%s)\n", f[0], f[1])
			detachLoop(f[0])
		}
	}
	var stale []string
	for _, mp := range mountPoints() {
		if strings.HasPrefix(mp, prefix) {
			stale = append(stale, mp)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(stale)))
	for _, mp := range stale {
		fmt.Fprintf(os.Stderr, "bench: unmounting stale %s\n", mp)
		unix.Unmount(mp, unix.MNT_DETACH)
	}
}
