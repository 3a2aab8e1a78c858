package formats

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// ReadBlocks is the ReadAt of a driver that maps the guest piece by
// piece. It rejects a negative off, clips the request at size (a read
// reaching past it returns what lies before and io.EOF, as io.ReaderAt
// asks), and calls read for consecutive pieces of the rest, none crossing
// a multiple of block (block 0 does not split). read fills q, or a
// leading part of it when the driver's own mapping unit ends sooner, with
// the guest bytes at pos and returns how many it filled. name is the
// image's file name, for the error message.
func ReadBlocks(name string, p []byte, off, size, block int64, read func(q []byte, pos int64) (int, error)) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d: %w", name, off, ErrnoError{unix.EIO})
	}
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	for done := 0; done < n; {
		pos := off + int64(done)
		k, err := read(p[done:done+piece(n-done, pos, block)], pos)
		if err != nil {
			return done, err
		}
		if k <= 0 {
			// A driver whose map does not cover pos would loop forever.
			return done, fmt.Errorf("%s: read at offset %d made no progress: %w", name, pos, io.ErrNoProgress)
		}
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteBlocks is the WriteAt of a driver that maps the guest block by
// block. A write that does not fit in size fails as a whole, as in QEMU;
// otherwise write gets consecutive pieces of p, none crossing a multiple
// of block (block 0 does not split), with the guest offset of each.
func WriteBlocks(name string, p []byte, off, size, block int64, write func(q []byte, pos int64) error) (int, error) {
	if off < 0 || off > size || int64(len(p)) > size-off {
		return 0, fmt.Errorf("%s: write of %d bytes at offset %d outside the image (%d bytes): %w",
			name, len(p), off, size, ErrnoError{unix.EIO})
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		k := piece(len(p)-done, pos, block)
		if err := write(p[done:done+k], pos); err != nil {
			return done, err
		}
		done += k
	}
	return len(p), nil
}

// piece is how many of the left bytes from pos stay within pos's block.
func piece(left int, pos, block int64) int {
	if block <= 0 {
		return left
	}
	return int(min(int64(left), block-pos%block))
}

// MappedRun is the block-status walk of a format that maps guest blocks
// of size block to host offsets (hostOffset returns < 0 for an
// unallocated block): from off, at most length bytes that are all
// unallocated, or all allocated at contiguous host offsets. host is the
// host offset of off, < 0 when unallocated.
func MappedRun(off, length, block int64, hostOffset func(int64) int64) (host, n int64) {
	host = hostOffset(off)
	for n < length {
		h := hostOffset(off + n)
		if (h < 0) != (host < 0) || host >= 0 && h != host+n {
			break
		}
		n += min(length-n, block-(off+n)%block)
	}
	return host, n
}

// WithHostHoles is QEMU's BDRV_BLOCK_RECURSE step for a data extent at a
// host offset of f: where the host file has a hole, the extent reads as
// zeroes, and the extent ends where the host file changes between data
// and hole.
func WithHostHoles(f *File, e Extent) Extent {
	data, n, err := f.DataStatus(e.Offset, e.Length)
	if err == nil && n > 0 {
		e.Length = n
		if !data {
			e.Status |= StatusZero
		}
	}
	return e
}

// zeroPage is what IsZero compares against.
var zeroPage [4096]byte

// IsZero reports whether b holds only zero bytes. It compares a page at
// a time, which the runtime does with vector instructions.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if string(b[:n]) != string(zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
