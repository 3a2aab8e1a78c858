package formats

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// File is a host file holding an image or part of one (a qcow2 external
// data file, a VMDK extent). It is safe for concurrent use: every method
// is a positioned system call.
type File struct {
	f        *os.File
	name     string
	readOnly bool
}

// OpenFile opens a host file. direct asks for O_DIRECT (cache modes
// "none" and "directsync").
func OpenFile(name string, readOnly, direct bool) (*File, error) {
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
	return &File{f: f, name: name, readOnly: readOnly}, nil
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
	n, err := f.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// WriteAt writes p at off.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if f.readOnly {
		return 0, ErrReadOnly
	}
	return f.f.WriteAt(p, off)
}

// Size is the current length of the file.
func (f *File) Size() (int64, error) {
	st, err := f.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
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

// Sync makes written data durable.
func (f *File) Sync() error { return unix.Fdatasync(int(f.f.Fd())) }

// Close closes the file.
func (f *File) Close() error { return f.f.Close() }

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
