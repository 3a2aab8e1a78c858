// Package fs serves a directory of disk images as a FUSE filesystem
// (DESIGN.md, "The mounted tree"): every image in SOURCE appears as a
// directory holding `disk`, the guest-visible bytes read and written
// through the format driver, and the report files `info`, `info.json`,
// `map.json` and `check`, which hold exactly what the matching imgfs
// commands print.
//
// The package is a go-fuse v2 node tree: the root (root.go), one node
// per image (image.go) that owns the image's single open formats.Image,
// the disk file (disk.go) and the report files (report.go). Errors become
// errnos in one function (errno.go). It knows no format: images open
// through formats.Open and reports come from control.
package fs

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Options configure a mount.
type Options struct {
	// Source is the directory of images, or a single image file.
	Source string
	// ReadOnly refuses every change with EROFS (-o ro).
	ReadOnly bool
	// AllowOutside lets backing and data files lie outside Source.
	AllowOutside bool
	// AllowRoot (-o allow_root) admits root besides the mounting user.
	// The kernel is told allow_other, and the root directory turns
	// everybody else away.
	AllowRoot bool
	// Passphrase unlocks every encrypted image (LUKS, encrypted qcow2
	// and qcow): -o key_file=PATH, read as qemu-img reads a secret
	// object's file. nil: encrypted images cannot be opened.
	Passphrase []byte
	// UID and GID own every file (-o uid=N,gid=N); 0 leaves root.
	UID, GID uint32
	// ReadAheadKB is the mount's readahead in KiB (-o read_ahead_kb=N);
	// 0 means defaultReadAheadKB.
	ReadAheadKB int
	// Logf receives what cannot be returned to a caller (a failed
	// close, a recovered panic). nil discards it.
	Logf func(format string, args ...any)
}

// tree is the state shared by every node of one mount.
type tree struct {
	src      *source
	readOnly bool
	logf     func(format string, args ...any)
	// restrict: only root and owner may enter the mount (allow_root).
	restrict bool
	owner    uint32

	mu sync.Mutex // guards open and closed; taken after an imageDir's mu
	// open holds the image directories whose image is open, so that
	// shutdown can flush and close them.
	open   map[*imageDir]bool
	closed bool
}

// Server is a mounted imgfs.
type Server struct {
	*fuse.Server
	t *tree
}

// diskAttrTimeout is how long the kernel may keep disk's attributes: its
// size changes only through the mount, which answers truncate with the
// new attributes. Everything else is given no timeout, so images added
// to SOURCE and changed reports show at once.
const diskAttrTimeout = time.Second

// Mount mounts SOURCE (o.Source) on mountpoint and serves it in the
// background; it returns once the kernel has the mount. mo carries the
// FUSE mount options (allow_other, fsname, ...).
func Mount(mountpoint string, o Options, mo fuse.MountOptions) (*Server, error) {
	src, err := newSource(o.Source, o.AllowOutside, o.Passphrase)
	if err != nil {
		return nil, err
	}
	t := &tree{src: src, readOnly: o.ReadOnly, logf: o.Logf, open: map[*imageDir]bool{},
		restrict: o.AllowRoot, owner: uint32(os.Getuid())}
	if t.logf == nil {
		t.logf = func(string, ...any) {}
	}
	if mo.Name == "" {
		mo.Name = "imgfs"
	}
	if mo.FsName == "" {
		mo.FsName = o.Source
	}
	// A panic is a bug, but it must not take every other image of the
	// mount down with it: the request fails with EIO and is logged.
	mo.PanicHandler = func(v any) fuse.Status {
		t.logf("imgfs: internal error in a FUSE request: %v", v)
		return fuse.EIO
	}
	if o.AllowRoot {
		mo.AllowOther = true
	}
	// open(O_TRUNC) reaches Open as a flag instead of as a truncation,
	// so disk can ignore it as a block device does (see diskNode.Open).
	mo.ExtraCapabilities |= fuse.CAP_ATOMIC_O_TRUNC
	// disk is read and written with direct I/O (see diskNode.Open) in
	// requests of up to maxRequest; mmap of it still works.
	mo.ExtraCapabilities |= fuse.CAP_DIRECT_IO_ALLOW_MMAP
	if mo.MaxWrite == 0 {
		mo.MaxWrite = maxRequest
	}
	// Replies carry bytes from memory, never a file to splice from; with
	// splicing on, go-fuse sets up a pipe for each read reply before
	// finding that out (and logs an error for each of 1 MiB).
	mo.DisableSplice = true
	// The kernel refuses writes too, so they fail before reaching us.
	// mount(2) takes read-only as a flag; fusermount3 as an option.
	if o.ReadOnly && (mo.DirectMount || mo.DirectMountStrict) {
		if mo.DirectMountFlags == 0 {
			mo.DirectMountFlags = syscall.MS_NOSUID | syscall.MS_NODEV
		}
		mo.DirectMountFlags |= syscall.MS_RDONLY
	} else if o.ReadOnly {
		mo.Options = append(mo.Options, "ro")
	}
	opts := &gofs.Options{MountOptions: mo, UID: o.UID, GID: o.GID}
	srv, err := gofs.Mount(mountpoint, &root{t: t}, opts)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	if err := setReadAhead(mountpoint, cmp.Or(o.ReadAheadKB, defaultReadAheadKB)); err != nil {
		t.logf("imgfs: %s: cannot set the readahead: %v", mountpoint, err)
	}
	return &Server{Server: srv, t: t}, nil
}

// maxRequest is the largest read or write the kernel sends, the most
// Linux allows: a 1 MiB read of disk is one request instead of eight.
const maxRequest = 1 << 20

// defaultReadAheadKB is the readahead of a mount unless -o read_ahead_kb
// says otherwise; it serves the files read through the page cache
// (convert-to/, snapshots/), disk being read with direct I/O. The kernel
// gives a FUSE mount 128 KiB, which makes a sequential reader wait for
// each 128 KiB in turn. Measured when disk still went through the page
// cache, on a qcow2 of a 4 GiB ext4 disk (dd with 1 MiB reads, cold
// caches): 128 KiB gave 0.5-0.9 GB/s, 512 KiB 1.8-2.5, 1 MiB 2.3-2.9,
// 2 MiB 1.2 and 8 MiB 0.5: beyond 1 MiB, so many requests are in flight
// at once that the image file underneath is read out of order and its
// own readahead stops.
const defaultReadAheadKB = 1024

// setReadAhead sets the readahead of the mount's backing device info,
// which only the kernel's sysfs can change after mount (the FUSE init
// reply can only lower it).
func setReadAhead(mountpoint string, kb int) error {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return err
	}
	name := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(name, []byte(strconv.Itoa(kb)), 0)
}

// Wait waits until the filesystem is unmounted (by Unmount, fusermount
// -u or umount), then flushes and closes every image still open.
func (s *Server) Wait() error {
	s.Server.Wait()
	return s.t.closeAll()
}

// closeAll closes every open image; requests arriving later fail.
func (t *tree) closeAll() error {
	t.mu.Lock()
	t.closed = true
	dirs := make([]*imageDir, 0, len(t.open))
	for d := range t.open {
		dirs = append(dirs, d)
	}
	t.mu.Unlock()
	var first error
	for _, d := range dirs {
		if err := d.closeImage(); err != nil {
			t.logf("imgfs: closing %s: %v", d.path, err)
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// register records that d's image is open; it fails once the mount is
// shutting down.
func (t *tree) register(d *imageDir) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return syscall.ESHUTDOWN
	}
	t.open[d] = true
	return nil
}

func (t *tree) unregister(d *imageDir) {
	t.mu.Lock()
	delete(t.open, d)
	t.mu.Unlock()
}

// notifyContent drops the kernel's cached pages of n in [off, off+n).
// It runs in its own goroutine because the kernel may wait for a read
// request in flight on those pages, which another handler is serving.
func notifyContent(n *gofs.Inode, off, length int64) {
	go n.NotifyContent(off, length)
}

// setHostAttr copies the host file's times into a, and gives it a link
// count (2 for directories, which have no subdirectories here).
func setHostAttr(a *fuse.Attr, k fileKey) {
	a.Nlink = 1
	if a.Mode&syscall.S_IFDIR != 0 {
		a.Nlink = 2
	}
	at, mt, ct := time.Unix(0, k.atime), time.Unix(0, k.mtime), time.Unix(0, k.ctime)
	a.SetTimes(&at, &mt, &ct)
}

// admit enforces allow_root: with it, only root and the mounting user
// get past the root directory.
func (t *tree) admit(ctx context.Context) syscall.Errno {
	if !t.restrict {
		return 0
	}
	if c, ok := ctx.(*fuse.Context); ok && c.Caller.Uid != 0 && c.Caller.Uid != t.owner {
		return syscall.EACCES
	}
	return 0
}
