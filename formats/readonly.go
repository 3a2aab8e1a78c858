package formats

import (
	"fmt"
	"syscall"
)

// ReadOnlyBase is what the read-only drivers (dmg, bochs, cloop) have in
// common: an image over one host file that refuses writes and, like the
// QEMU drivers without block status, reports every byte as data without
// a host offset. A driver embeds it and adds ReadAt and Format.
type ReadOnlyBase struct {
	File        *File
	VirtualSize int64
}

func (b *ReadOnlyBase) Size() int64      { return b.VirtualSize }
func (b *ReadOnlyBase) Filename() string { return b.File.Name() }

// WriteAt refuses: the format is read-only.
func (b *ReadOnlyBase) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }

// BlockStatus is what QEMU's block layer reports for a driver without
// block status: all data, no host offset.
func (b *ReadOnlyBase) BlockStatus(off, length int64) (Extent, error) {
	if off < 0 || length < 0 {
		return Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w",
			b.File.Name(), length, off, ErrnoError{Err: syscall.EIO})
	}
	return Extent{Length: min(length, max(b.VirtualSize-off, 0)), Status: StatusData}, nil
}

// Describe adds nothing: these QEMU drivers have no bdrv_get_info.
func (b *ReadOnlyBase) Describe() (*Description, error) { return &Description{}, nil }

func (b *ReadOnlyBase) Flush() error { return nil }
func (b *ReadOnlyBase) Close() error { return b.File.Close() }
