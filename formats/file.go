package formats

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a host file holding an image or part of one (a qcow2 external
// data file, a VMDK extent). It is safe for concurrent use: every method
// is a positioned system call.
type File struct {
	f        *os.File
	name     string
	readOnly bool
	// direct files need aligned buffers, offsets and lengths; rmw
	// serialises the read-modify-write of unaligned direct writes so two
	// of them sharing a block cannot lose each other's bytes.
	direct bool
	rmw    sync.Mutex
	// locked is set by LockFile so Close drops the lock bytes itself.
	locked bool
	// noFlush: Sync does nothing (cache=unsafe).
	noFlush bool
}

// directAlign is the alignment O_DIRECT I/O is done with: the largest
// logical block size in common use, as QEMU probes it.
const directAlign = 4096

// OpenFile opens a host file. direct asks for O_DIRECT (cache modes
// "none" and "directsync").
func OpenFile(name string, readOnly, direct bool) (*File, error) {
	if st, err := os.Stat(name); err == nil && st.IsDir() {
		return nil, fmt.Errorf("'file' driver requires '%s' to be a regular file", name)
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	if direct {
		flag |= unix.O_DIRECT
	}
	f, err := os.OpenFile(name, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("Could not open '%s': %w", name, errnoOf(err))
	}
	return &File{f: f, name: name, readOnly: readOnly, direct: direct}, nil
}

// CreateFile creates (or empties) a host file for a new image. As QEMU's
// file-posix create does, it locks the file for writing and resizing
// before emptying it, so an image another process uses is not destroyed;
// the locks last until the file is closed.
func CreateFile(name string) (*File, error) {
	osf, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("Could not create '%s': %w", name, errnoOf(err))
	}
	f := &File{f: osf, name: name}
	if _, err := LockFile(f, Perms{Hold: PermWrite | PermResize, Share: PermAll &^ PermResize}); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, fmt.Errorf("Could not resize file: %w", errnoOf(err))
	}
	return f, nil
}

// errnoOf strips the *PathError so messages read like QEMU's
// ("No such file or directory"), not Go's.
func errnoOf(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return ErrnoError{pe.Err}
	}
	return err
}

// ErrnoError prints an errno as strerror does, with a capital letter.
type ErrnoError struct{ Err error }

func (e ErrnoError) Error() string {
	s := e.Err.Error()
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		s = string(s[0]-'a'+'A') + s[1:]
	}
	return s
}

func (e ErrnoError) Unwrap() error { return e.Err }

// Name is the path the file was opened by.
func (f *File) Name() string { return f.name }

// ReadOnly reports whether the file was opened without write access.
func (f *File) ReadOnly() bool { return f.readOnly }

// Fd is the file descriptor, for locking.
func (f *File) Fd() uintptr { return f.f.Fd() }

// ReadAt reads len(p) bytes; bytes past the end of the file read as zeroes,
// as QEMU's file protocol does for images whose last cluster is short.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if f.direct && !aligned(p, off) {
		start, buf := bounce(p, off)
		if _, err := f.ReadAt(buf, start); err != nil {
			return 0, err
		}
		return copy(p, buf[off-start:]), nil
	}
	n, err := f.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// WillNeed asks the kernel to start reading [off, off+n) into the page
// cache and returns without waiting: callers that are about to read many
// scattered pieces one after another let the disk work on the next ones
// meanwhile. It is advice, so errors are ignored; direct files bypass the
// page cache and get none.
func (f *File) WillNeed(off, n int64) {
	if !f.direct {
		_ = unix.Fadvise(int(f.f.Fd()), off, n, unix.FADV_WILLNEED)
	}
}

// WriteAt writes p at off.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if f.readOnly {
		return 0, ErrReadOnly
	}
	if f.direct && !aligned(p, off) {
		f.rmw.Lock()
		defer f.rmw.Unlock()
		start, buf := bounce(p, off)
		if _, err := f.ReadAt(buf, start); err != nil {
			return 0, err
		}
		copy(buf[off-start:], p)
		if _, err := f.f.WriteAt(buf, start); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return f.f.WriteAt(p, off)
}

// aligned reports whether p and off can go to an O_DIRECT file as they are.
func aligned(p []byte, off int64) bool {
	return off%directAlign == 0 && len(p)%directAlign == 0 &&
		(len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%directAlign == 0)
}

// bounce returns an aligned buffer covering [off, off+len(p)) and its
// file offset.
func bounce(p []byte, off int64) (int64, []byte) {
	start := off &^ (directAlign - 1)
	end := (off + int64(len(p)) + directAlign - 1) &^ (directAlign - 1)
	raw := make([]byte, end-start+directAlign)
	shift := int(directAlign-uintptr(unsafe.Pointer(&raw[0]))%directAlign) % directAlign
	return start, raw[shift : shift+int(end-start)]
}

// Size is the current length of the file.
func (f *File) Size() (int64, error) {
	st, err := f.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// PastEnd reports whether off lies past the end of a regular file, so
// that everything from there reads as zeroes until written (a device
// has no such end).
func (f *File) PastEnd(off int64) (bool, error) {
	st, err := f.f.Stat()
	if err != nil {
		return false, err
	}
	return st.Mode().IsRegular() && off >= st.Size(), nil
}

// AllocatedSize is the number of bytes the file occupies on disk
// (st_blocks * 512), what qemu-img info calls "disk size".
func (f *File) AllocatedSize() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.f.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// Truncate sets the file length.
func (f *File) Truncate(size int64) error { return f.f.Truncate(size) }

// SetNoFlush makes Sync do nothing from now on (cache=unsafe).
func (f *File) SetNoFlush() { f.noFlush = true }

// Sync makes written data durable.
func (f *File) Sync() error {
	if f.noFlush {
		return nil
	}
	return unix.Fdatasync(int(f.f.Fd()))
}

// CopyRangeTo copies n bytes at off to dst at dstOff inside the kernel
// (copy_file_range). It fails when the kernel cannot, e.g. across
// filesystems or past the end of f; callers then copy through memory.
func (f *File) CopyRangeTo(dst *File, off, dstOff, n int64) error {
	if dst.readOnly {
		return ErrReadOnly
	}
	for n > 0 {
		m, err := unix.CopyFileRange(int(f.f.Fd()), &off, int(dst.f.Fd()), &dstOff, int(min(n, 1<<30)), 0)
		if err != nil {
			return err
		}
		if m == 0 {
			return io.ErrUnexpectedEOF
		}
		n -= int64(m)
	}
	return nil
}

// Close closes the file.
//
// The lock bytes are released explicitly before the close: the kernel
// drops OFD locks only when the last reference to the open file
// description goes, and a child forked by another goroutine holds one
// until it execs, which would leave the image locked for a moment after
// we are done with it.
func (f *File) Close() error {
	if f.locked {
		unlockAll(f.Fd())
	}
	return f.f.Close()
}

// Allocate reserves space for [off, off+length) without changing the
// file size beyond off+length (fallocate mode 0).
func (f *File) Allocate(off, length int64) error {
	return unix.Fallocate(int(f.f.Fd()), 0, off, length)
}

// PunchHole deallocates [off, off+length); the range reads as zeroes.
func (f *File) PunchHole(off, length int64) error {
	return unix.Fallocate(int(f.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// ZeroRange makes [off, off+length) read as zeroes and keeps it
// allocated (FALLOC_FL_ZERO_RANGE); it may grow the file.
func (f *File) ZeroRange(off, length int64) error {
	return unix.Fallocate(int(f.f.Fd()), unix.FALLOC_FL_ZERO_RANGE, off, length)
}

// DataStatus reports whether off lies in data or in a hole, and how many
// bytes from off (at most length) share that state, using
// SEEK_DATA/SEEK_HOLE. Past the end of the file is a hole.
func (f *File) DataStatus(off, length int64) (data bool, n int64, err error) {
	fd := int(f.f.Fd())
	d, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return false, length, nil
	}
	if err != nil {
		// Filesystems without SEEK_DATA: everything is data.
		return true, length, nil
	}
	if d > off {
		return false, min(d-off, length), nil
	}
	h, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil {
		return true, length, nil
	}
	return true, min(h-off, length), nil
}
