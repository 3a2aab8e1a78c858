package main

import (
	"errors"
	"fmt"
	"io"
	"log/syslog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/fs"
)

// `imgfs mount` and `imgfs umount`, and the mount helper conventions.
//
// fstab: a line `SOURCE MOUNTPOINT fuse.imgfs OPTIONS` makes mount(8)
// look for /sbin/mount.fuse.imgfs first (a symlink to imgfs, which then
// runs as a helper: `mount.fuse.imgfs SOURCE MOUNTPOINT -o OPTIONS`).
// Without that symlink mount(8) runs mount.fuse3, which strips the
// fstab-only options (user, noauto, nofail, _netdev, ...), adds "dev"
// and "suid" unless nodev/nosuid were given, and runs the subtype as a
// program through /bin/sh: `imgfs SOURCE MOUNTPOINT -o OPTIONS`. With
// drop_privileges MOUNTPOINT is /dev/fd/N, a /dev/fuse descriptor it
// mounted already. A `-t imgfs` mount runs /sbin/mount.imgfs the same
// way. All three forms are recognised by mountHelperArgs.

func init() {
	commands = append(commands,
		&cli.Command{
			Name:      "mount",
			Usage:     "mount a directory of images (or one image) as a FUSE filesystem",
			ArgsUsage: "SOURCE MOUNTPOINT",
			Flags: []cli.Flag{
				&cli.StringSliceFlag{Name: "o", Usage: "mount options: ro, allow_other, allow_root, default_permissions, uid=N, gid=N, allow_outside, key_file=PATH, read_ahead_kb=N, ..."},
				&cli.BoolFlag{Name: "f", Usage: "stay in the foreground"},
			},
			Action: runMount,
		},
		&cli.Command{
			Name:      "umount",
			Usage:     "unmount an imgfs mount and wait until its images are closed",
			ArgsUsage: "MOUNTPOINT",
			Action:    runUmount,
		})
}

// readyEnv names the descriptor on which a daemonised mount reports to
// the process that started it: "ok\n" once mounted, else the error.
const readyEnv = "IMGFS_MOUNT_READY_FD"

// mountConfig is what the -o options ask for.
type mountConfig struct {
	fs fs.Options
	mo fuse.MountOptions
	// keyFile is -o key_file=PATH, made absolute: the passphrase of
	// encrypted images.
	keyFile string
}

// kernelOptions are the generic mount flags passed on to the kernel
// (through fusermount3 or mount(2)).
var kernelOptions = map[string]bool{
	"dev": true, "nodev": true, "suid": true, "nosuid": true, "exec": true, "noexec": true,
	"atime": true, "noatime": true, "diratime": true, "nodiratime": true, "relatime": true,
	"norelatime": true, "strictatime": true, "nostrictatime": true, "lazytime": true,
	"nolazytime": true, "sync": true, "async": true, "dirsync": true, "default_permissions": true,
}

// fstabOnlyOptions mean something to mount(8) or fstab, not to a
// filesystem; helpers receive them and ignore them.
var fstabOnlyOptions = map[string]bool{
	"defaults": true, "auto": true, "noauto": true, "user": true, "users": true, "nouser": true,
	"owner": true, "group": true, "nofail": true, "_netdev": true,
}

// parseMountOptions reads -o values (each a comma-separated list).
func parseMountOptions(values []string) (*mountConfig, error) {
	cfg := &mountConfig{}
	for _, v := range values {
		for _, o := range strings.Split(v, ",") {
			name, val, hasVal := strings.Cut(o, "=")
			switch {
			case o == "" || fstabOnlyOptions[o] || strings.HasPrefix(o, "x-") || name == "comment":
			case o == "ro":
				cfg.fs.ReadOnly = true
			case o == "rw":
				cfg.fs.ReadOnly = false
			case o == "allow_outside":
				cfg.fs.AllowOutside = true
			case o == "allow_other":
				cfg.mo.AllowOther = true
			case o == "allow_root":
				cfg.fs.AllowRoot = true
			case o == "debug":
				cfg.mo.Debug = true
			case kernelOptions[o]:
				cfg.mo.Options = append(cfg.mo.Options, o)
			case hasVal && (name == "uid" || name == "gid"):
				id, err := strconv.ParseUint(val, 10, 32)
				if err != nil {
					return nil, fmt.Errorf("invalid mount option '%s': not a number", o)
				}
				if name == "uid" {
					cfg.fs.UID = uint32(id)
				} else {
					cfg.fs.GID = uint32(id)
				}
			case hasVal && name == "key_file":
				abs, err := filepath.Abs(val)
				if err != nil {
					return nil, err
				}
				cfg.keyFile = abs
			case hasVal && name == "read_ahead_kb":
				kb, err := strconv.Atoi(val)
				if err != nil || kb < 0 {
					return nil, fmt.Errorf("invalid mount option '%s': not a number", o)
				}
				cfg.fs.ReadAheadKB = kb
			case hasVal && name == "fsname":
				cfg.mo.FsName = val
			case hasVal && name == "subtype":
				cfg.mo.Name = val
			default:
				return nil, fmt.Errorf("unknown mount option '%s'", o)
			}
		}
	}
	if cfg.fs.AllowRoot && cfg.mo.AllowOther {
		return nil, errors.New("allow_other and allow_root are mutually exclusive")
	}
	return cfg, nil
}

func runMount(c *cli.Context) error {
	if c.NArg() != 2 {
		return usageError{"Expecting SOURCE and MOUNTPOINT"}
	}
	cfg, err := parseMountOptions(c.StringSlice("o"))
	if err != nil {
		return err
	}
	source, mountpoint := c.Args().Get(0), c.Args().Get(1)
	if source, err = filepath.Abs(source); err != nil {
		return err
	}
	if parseFdMountpoint(mountpoint) < 0 {
		if mountpoint, err = filepath.Abs(mountpoint); err != nil {
			return err
		}
		if err := checkMountpoint(source, mountpoint); err != nil {
			return err
		}
	}
	if cfg.keyFile != "" {
		// As qemu-img reads `--object secret,file=PATH`: every byte,
		// a trailing newline included.
		if cfg.fs.Passphrase, err = os.ReadFile(cfg.keyFile); err != nil {
			return fmt.Errorf("key_file: %w", err)
		}
	}
	fdStr := os.Getenv(readyEnv)
	if !c.Bool("f") && fdStr == "" {
		return daemonize(absKeyFile(c.StringSlice("o"), cfg.keyFile), source, mountpoint)
	}
	ready := func(error) {}
	logf := func(format string, args ...any) { fmt.Fprintf(c.App.ErrWriter, format+"\n", args...) }
	if fdStr != "" {
		os.Unsetenv(readyEnv)
		fd, err := strconv.Atoi(fdStr)
		if err != nil {
			return fmt.Errorf("%s: bad descriptor %q", readyEnv, fdStr)
		}
		pipe := os.NewFile(uintptr(fd), "ready")
		ready = func(err error) {
			msg := "ok\n"
			if err != nil {
				msg = err.Error()
			}
			io.WriteString(pipe, msg)
			pipe.Close()
		}
		// A daemon has no terminal; what it must say goes to syslog
		// when there is one.
		logf = func(string, ...any) {}
		if w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_WARNING, prog); err == nil {
			logf = func(format string, args ...any) { w.Warning(fmt.Sprintf(format, args...)) }
		}
	}
	cfg.fs.Source, cfg.fs.Logf = source, logf
	if cfg.mo.FsName == "" {
		cfg.mo.FsName = source
	}
	// As root, mount(2) needs no helper program; others go through
	// fusermount3.
	cfg.mo.DirectMount = os.Geteuid() == 0
	srv, err := fs.Mount(mountpoint, cfg.fs, cfg.mo)
	ready(err)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for range sigs {
			// Wait below then closes every image. A busy mount stays.
			if err := srv.Unmount(); err != nil {
				logf("%s: unmount %s: %v", prog, mountpoint, err)
			}
		}
	}()
	return srv.Wait()
}

// absKeyFile gives the background mount, which runs in /, the key_file
// option with its path made absolute.
func absKeyFile(values []string, abs string) []string {
	if abs == "" {
		return values
	}
	out := make([]string, len(values))
	for i, v := range values {
		opts := strings.Split(v, ",")
		for j, o := range opts {
			if strings.HasPrefix(o, "key_file=") {
				opts[j] = "key_file=" + abs
			}
		}
		out[i] = strings.Join(opts, ",")
	}
	return out
}

// checkMountpoint refuses to mount over SOURCE or a directory that
// contains it: the mount would hide the images it serves and its own
// scans of SOURCE would come back to itself.
func checkMountpoint(source, mountpoint string) error {
	st, err := os.Stat(mountpoint)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s: not a directory", mountpoint)
	}
	realSrc, err := filepath.EvalSymlinks(source)
	if err != nil {
		return err
	}
	realMnt, err := filepath.EvalSymlinks(mountpoint)
	if err != nil {
		return err
	}
	if realSrc == realMnt || strings.HasPrefix(realSrc, strings.TrimSuffix(realMnt, "/")+"/") {
		return fmt.Errorf("%s: the mount point must not contain SOURCE %s", mountpoint, source)
	}
	return nil
}

// parseFdMountpoint returns N for the mount point /dev/fd/N (a /dev/fuse
// descriptor mounted by mount.fuse3 drop_privileges), else -1.
func parseFdMountpoint(m string) int {
	rest, ok := strings.CutPrefix(m, "/dev/fd/")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 {
		return -1
	}
	return n
}

// daemonize runs the mount again in the background, detached from the
// terminal, and returns once it reports the mount ready (or failed).
func daemonize(opts []string, source, mountpoint string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	extra := []*os.File{w}
	if fd := parseFdMountpoint(mountpoint); fd >= 0 {
		// The child gets the descriptor as its fd 4.
		extra = append(extra, os.NewFile(uintptr(fd), mountpoint))
		mountpoint = "/dev/fd/4"
	}
	// exe, not os.Args[0]: under a helper name (mount.fuse.imgfs) the
	// child would parse its arguments as a helper call.
	args := []string{exe, "mount", "-f"}
	if o := strings.Join(opts, ","); o != "" {
		args = append(args, "-o", o)
	}
	cmd := &exec.Cmd{
		Path:       exe,
		Args:       append(args, "--", source, mountpoint),
		Env:        append(os.Environ(), readyEnv+"=3"),
		Dir:        "/",
		ExtraFiles: extra,
		// Its own session: the terminal's signals and hangup are not
		// for it, and it outlives this process. Its stdio is
		// /dev/null, so nobody waiting on our output waits on it.
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if err := cmd.Start(); err != nil {
		w.Close()
		return err
	}
	w.Close()
	msg, _ := io.ReadAll(r)
	if string(msg) == "ok\n" {
		return cmd.Process.Release()
	}
	// Reap it: it exits after reporting a failure.
	cmd.Wait()
	if len(msg) == 0 {
		return errors.New("the mount process exited without mounting")
	}
	return errors.New(string(msg))
}

// umountWait bounds how long umount waits for the serving process to
// flush and close its images.
const umountWait = 2 * time.Minute

func runUmount(c *cli.Context) error {
	if c.NArg() != 1 {
		return usageError{"Expecting MOUNTPOINT"}
	}
	mountpoint, err := filepath.Abs(c.Args().First())
	if err != nil {
		return err
	}
	pid := servingPid(mountpoint)
	if err := unmount(mountpoint); err != nil {
		return err
	}
	if pid <= 0 {
		return nil
	}
	deadline := time.Now().Add(umountWait)
	for processRunning(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: unmounted, but process %d still has not closed its images", mountpoint, pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// servingPid asks the mount which process serves it (see fs's root), 0
// when it cannot tell.
func servingPid(mountpoint string) int {
	buf := make([]byte, 32)
	n, err := unix.Getxattr(mountpoint, "user.imgfs.pid", buf)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(string(buf[:n]))
	if pid == os.Getpid() {
		return 0
	}
	return pid
}

// unmount detaches the mount: directly as root, else via fusermount3.
func unmount(mountpoint string) error {
	if os.Geteuid() == 0 {
		err := unix.Unmount(mountpoint, 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%s: %w", mountpoint, err)
		}
	}
	var lastErr error
	for _, helper := range []string{"fusermount3", "fusermount"} {
		path, err := exec.LookPath(helper)
		if err != nil {
			lastErr = err
			continue
		}
		out, err := exec.Command(path, "-u", mountpoint).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s", strings.TrimSpace(string(out)))
		}
		return nil
	}
	return fmt.Errorf("%s: cannot unmount: %w", mountpoint, lastErr)
}

// processRunning reports whether pid is alive; a zombie (exited, not yet
// reaped by whoever adopted it) is not.
func processRunning(pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// The state follows the command name in parentheses.
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}

// mountHelperNames are the names under which mount(8) runs imgfs as a
// mount helper (`mount -t imgfs`, `mount -t fuse.imgfs`).
var mountHelperNames = map[string]bool{"mount.imgfs": true, "mount.fuse.imgfs": true, "mount.fuseblk.imgfs": true}

// mountHelperArgs recognises a mount helper call (see the comment at the
// top of this file) and rewrites it as `imgfs mount -o OPTS SOURCE
// MOUNTPOINT`; other command lines come back unchanged. isCommand tells
// whether a word names an imgfs command, so `imgfs SOURCE MOUNTPOINT`
// from mount.fuse3 is told from a mistyped command.
func mountHelperArgs(args []string, isCommand func(string) bool) ([]string, error) {
	if len(args) < 3 {
		return args, nil
	}
	if !mountHelperNames[filepath.Base(args[0])] {
		if isCommand(args[1]) || strings.HasPrefix(args[1], "-") || !isMountTarget(args[2]) {
			return args, nil
		}
		if _, err := os.Stat(args[1]); err != nil {
			return args, nil
		}
	}
	var operands, opts []string
	for i := 1; i < len(args); i++ {
		switch a := args[i]; a {
		case "-o", "-t", "-N":
			if i+1 >= len(args) {
				return nil, usageError{fmt.Sprintf("option '%s' needs an argument", a)}
			}
			i++
			switch a {
			case "-o":
				opts = append(opts, args[i])
			case "-N":
				return nil, errors.New("mount namespaces (-N) are not supported")
			}
		case "-n", "-s", "-v":
			// no mtab, sloppy, verbose: nothing to do for a FUSE mount
		case "-f":
			return nil, errors.New("fake mounts (-f) are not supported")
		default:
			operands = append(operands, a)
		}
	}
	if len(operands) != 2 {
		return nil, usageError{"Expecting SOURCE and MOUNTPOINT"}
	}
	out := []string{args[0], "mount"}
	if len(opts) > 0 {
		out = append(out, "-o", strings.Join(opts, ","))
	}
	return append(out, "--", operands[0], operands[1]), nil
}

// isMountTarget: a directory, or a /dev/fd/N descriptor mount point.
func isMountTarget(p string) bool {
	if parseFdMountpoint(p) >= 0 {
		return true
	}
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}
