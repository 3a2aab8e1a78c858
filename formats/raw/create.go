package raw

import (
	"errors"
	"fmt"
	"math"

	"github.com/imgfs/imgfs/formats"
	"golang.org/x/sys/unix"
)

// prealloc is a preallocation mode (QAPI PreallocMode).
type prealloc int

const (
	preallocOff prealloc = iota
	preallocMetadata
	preallocFalloc
	preallocFull
)

var preallocNames = map[string]prealloc{
	"off": preallocOff, "metadata": preallocMetadata, "falloc": preallocFalloc, "full": preallocFull,
}

// parsePrealloc reads a preallocation mode. QEMU knows "metadata" too,
// but only formats with metadata can do it: truncate refuses it for raw.
func parsePrealloc(s string) (prealloc, error) {
	m, ok := preallocNames[s]
	if !ok {
		return 0, formats.Errorf(formats.ErrInvalidOption, "invalid parameter value: %s", s)
	}
	return m, nil
}

// create makes a raw image as qemu-img create does: validate the
// options, create (or empty) the file under QEMU's creation locks, then
// size it, preallocating as asked. The size is rounded up to a sector.
func create(filename string, opts *formats.Options) error {
	size, _ := opts.Uint("size")
	mode := preallocOff
	if opts.Has("preallocation") {
		var err error
		if mode, err = parsePrealloc(opts.String("preallocation")); err != nil {
			return err
		}
	}
	if hint, ok := opts.Uint("extent_size_hint"); ok && hint > math.MaxUint32 {
		return formats.Errorf(formats.ErrInvalidOption, "Extent size hint is too large")
	}
	f, err := formats.CreateFile(filename)
	if err != nil {
		return err
	}
	if opts.Bool("nocow") {
		setNoCOW(f)
	}
	// QEMU also sets the extent size hint (FS_IOC_FSSETXATTR), which only
	// changes how XFS allocates; imgfs validates it above but does not
	// apply it.

	// The size is rounded in uint64 like QEMU, so sizes past 2^63 fail in ftruncate
	// ("Invalid argument") as they do there.
	if err := truncate(f, int64((size+sectorSize-1)&^(sectorSize-1)), mode); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fsNoCOWFlag is FS_NOCOW_FL from linux/fs.h (not in x/sys/unix).
const fsNoCOWFlag = 0x00800000

// setNoCOW turns off copy-on-write (btrfs). Like QEMU it ignores
// failure: other file systems do not know the flag.
func setNoCOW(f *formats.File) {
	fd := int(f.Fd())
	if attr, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS); err == nil {
		unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, attr|fsNoCOWFlag)
	}
}

// truncate sets the file to exactly size bytes, filling a grown part
// according to mode, as file-posix's handle_aiocb_truncate does. A new
// file grown without full preallocation gets its first block written, as
// QEMU does to help its alignment probing; `qemu-img map` shows that
// block as data, and so must ours.
func truncate(f *formats.File, size int64, mode prealloc) error {
	cur, err := f.Size()
	if err != nil {
		return fmt.Errorf("Could not stat file: %w", formats.ErrnoError{Err: err})
	}
	if cur > size && mode != preallocOff {
		return formats.Errorf(formats.ErrUnsupported, "Cannot use preallocation for shrinking files")
	}
	switch mode {
	case preallocOff:
		if err := f.Truncate(size); err != nil {
			return fmt.Errorf("Could not resize file: %w", errnoOf(err))
		}
		if cur == 0 && size > 0 {
			formats.AllocateFirstBlock(f, size)
		}
		return nil
	case preallocFalloc:
		if size == cur {
			return nil
		}
		if err := allocate(f, cur, size-cur); err != nil {
			f.Truncate(cur)
			return fmt.Errorf("Could not preallocate new data: %w", errnoOf(err))
		}
		if cur == 0 {
			formats.AllocateFirstBlock(f, size)
		}
		return nil
	case preallocFull:
		if err := f.Truncate(size); err != nil {
			return fmt.Errorf("Could not resize file: %w", errnoOf(err))
		}
		if err := writeZeroBuffers(f, cur, size-cur); err != nil {
			f.Truncate(cur)
			return fmt.Errorf("Could not write zeros for preallocation: %w", errnoOf(err))
		}
		if err := f.Sync(); err != nil {
			f.Truncate(cur)
			return fmt.Errorf("Could not flush file to disk: %w", errnoOf(err))
		}
		return nil
	}
	return formats.Errorf(formats.ErrUnsupported, "Unsupported preallocation mode: metadata")
}

// TruncateFile is the file protocol's truncate for the drivers that sit
// on a host file as QEMU's sit on file-posix (raw, luks): it sets f to
// exactly size bytes, filling a grown part as the preallocation mode
// prealloc asks ("" is off).
func TruncateFile(f *formats.File, size int64, prealloc string) error {
	mode := preallocOff
	if prealloc != "" {
		var err error
		if mode, err = parsePrealloc(prealloc); err != nil {
			return err
		}
	}
	return truncate(f, size, mode)
}

// allocate reserves [off, off+length) as posix_fallocate does: with
// fallocate, or by writing zeroes where the file system cannot.
func allocate(f *formats.File, off, length int64) error {
	err := f.Allocate(off, length)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return writeZeroBuffers(f, off, length)
	}
	return err
}

// errnoOf turns a system error into QEMU's wording ("Invalid argument").
func errnoOf(err error) error {
	var ee formats.ErrnoError
	if errors.As(err, &ee) {
		return err
	}
	var se unix.Errno
	if errors.As(err, &se) {
		return formats.ErrnoError{Err: se}
	}
	return err
}
