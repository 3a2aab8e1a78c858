package control

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// Errors of compare that qemu-img tells apart by exit code.
var (
	// ErrAllocationTest: block status failed (exit 3).
	ErrAllocationTest = errors.New("sector allocation test failed")
	// ErrCompareRead: reading guest data failed (exit 4).
	ErrCompareRead = errors.New("read failed")
)

// CompareOptions are the inputs of `qemu-img compare`.
type CompareOptions struct {
	Image1, Image2 formats.Image
	// Name1 and Name2 are the names the user gave, for messages.
	Name1, Name2 string
	// Strict fails on a size or block status difference (-s).
	Strict   bool
	Progress Progress
	// Print, when set, receives each line of Text as it is produced, so
	// that it interleaves with the progress output as qemu-img's does.
	Print func(line string)
}

// CompareResult is the outcome of a completed comparison.
type CompareResult struct {
	// Identical: the images read the same (exit 0); otherwise they
	// differ (exit 1).
	Identical bool
	// Text is what qemu-img prints on stdout, e.g. "Images are
	// identical.\n" or "Content mismatch at offset 512!\n".
	Text string
}

// compareBuf is the most img_compare reads at once (IO_BUF_SIZE).
const compareBuf = 2 << 20

// sectorSize is QEMU's BDRV_SECTOR_SIZE: compare locates differences to
// the sector, convert detects zeroes by sectors.
const sectorSize = 512

// Block status bits as bdrv_block_status_above returns them; strict mode
// compares them all.
const (
	bsData        = 0x01
	bsZero        = 0x02
	bsOffsetValid = 0x04
	bsAllocated   = 0x10
	bsEOF         = 0x20
)

// Compare compares two images as img_compare does: by block status where
// both sides are known to read as zeroes, by content elsewhere.
func Compare(ctx context.Context, o CompareOptions) (*CompareResult, error) {
	c := comparer{o: o, buf1: make([]byte, compareBuf), buf2: make([]byte, compareBuf)}
	return c.run(ctx)
}

type comparer struct {
	o          CompareOptions
	buf1, buf2 []byte
	text       strings.Builder
	base, done int64
}

// say adds a line to the output.
func (c *comparer) say(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	c.text.WriteString(line)
	if c.o.Print != nil {
		c.o.Print(line)
	}
}

func (c *comparer) differ(format string, args ...any) (*CompareResult, error) {
	c.say(format, args...)
	return &CompareResult{Text: c.text.String()}, nil
}

func (c *comparer) progress(chunk int64) {
	c.done += chunk
	c.o.Progress.report(c.done, c.base)
}

func (c *comparer) run(ctx context.Context) (*CompareResult, error) {
	o := &c.o
	size1, size2 := o.Image1.Size(), o.Image2.Size()
	total := min(size1, size2)
	c.base = max(size1, size2)
	c.o.Progress.report(0, c.base)
	if o.Strict && size1 != size2 {
		return c.differ("Strict mode: Image size mismatch!\n")
	}
	for off := int64(0); off < total; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		s1, n1, err := compareStatus(o.Image1, off, size1-off)
		if err != nil {
			return nil, statusError(o.Name1, err)
		}
		s2, n2, err := compareStatus(o.Image2, off, size2-off)
		if err != nil {
			return nil, statusError(o.Name2, err)
		}
		chunk := min(n1, n2)
		if o.Strict && s1 != s2 {
			return c.differ("Strict mode: Offset %d block status mismatch!\n", off)
		}
		alloc1, alloc2 := s1&bsAllocated != 0, s2&bsAllocated != 0
		switch {
		case s1&bsZero != 0 && s2&bsZero != 0:
		case alloc1 == alloc2:
			if !alloc1 {
				break
			}
			chunk = min(chunk, compareBuf)
			// Both reads at once: on a cold cache each waits for the
			// disk, and the two images are independent.
			var err2 error
			read2 := make(chan struct{})
			go func() {
				defer close(read2)
				err2 = c.read(o.Image2, o.Name2, c.buf2[:chunk], off)
			}()
			err1 := c.read(o.Image1, o.Name1, c.buf1[:chunk], off)
			<-read2
			if err := cmp.Or(err1, err2); err != nil {
				return nil, err
			}
			if at := firstDifference(c.buf1[:chunk], c.buf2[:chunk]); at >= 0 {
				return c.differ("Content mismatch at offset %d!\n", off+at)
			}
		default:
			chunk = min(chunk, compareBuf)
			img, name := o.Image1, o.Name1
			if alloc2 {
				img, name = o.Image2, o.Name2
			}
			if at, err := c.nonZero(img, name, off, chunk); err != nil || at >= 0 {
				return c.mismatch(at, err)
			}
		}
		off += chunk
		c.progress(chunk)
	}
	if size1 != size2 {
		c.say("Warning: Image size mismatch!\n")
		over, name := o.Image1, o.Name1
		if size2 > size1 {
			over, name = o.Image2, o.Name2
		}
		for off := total; off < c.base; {
			s, chunk, err := compareStatus(over, off, c.base-off)
			if err != nil {
				return nil, statusError(name, err)
			}
			if s&bsAllocated != 0 && s&bsZero == 0 {
				chunk = min(chunk, compareBuf)
				if at, err := c.nonZero(over, name, off, chunk); err != nil || at >= 0 {
					return c.mismatch(at, err)
				}
			}
			off += chunk
			c.progress(chunk)
		}
	}
	c.say("Images are identical.\n")
	return &CompareResult{Identical: true, Text: c.text.String()}, nil
}

func (c *comparer) mismatch(at int64, err error) (*CompareResult, error) {
	if err != nil {
		return nil, err
	}
	return c.differ("Content mismatch at offset %d!\n", at)
}

func (c *comparer) read(img formats.Image, name string, buf []byte, off int64) error {
	if n, err := img.ReadAt(buf, off); err != nil && n < len(buf) {
		return &compareError{fmt.Sprintf("Error while reading offset %d of %s: %v", off, name, err), ErrCompareRead, err}
	}
	return nil
}

// compareError reads as qemu-img's message and unwraps to its kind
// (ErrAllocationTest or ErrCompareRead) and its cause.
type compareError struct {
	msg         string
	kind, cause error
}

func (e *compareError) Error() string   { return e.msg }
func (e *compareError) Unwrap() []error { return []error{e.kind, e.cause} }

// statusError is img_compare's block status failure; like qemu-img, the
// message does not name the cause.
func statusError(name string, err error) error {
	return &compareError{"Sector allocation test failed for " + name, ErrAllocationTest, err}
}

// nonZero reads [off, off+n) of img and returns the guest offset of the
// first sector holding a non-zero byte, or -1 (check_empty_sectors).
func (c *comparer) nonZero(img formats.Image, name string, off, n int64) (int64, error) {
	buf := c.buf1[:n]
	if err := c.read(img, name, buf, off); err != nil {
		return -1, err
	}
	for i := int64(0); i < n; i += sectorSize {
		if !formats.IsZero(buf[i:min(i+sectorSize, n)]) {
			return off + i, nil
		}
	}
	return -1, nil
}

// firstDifference returns the offset of the first 512-byte sector where
// a and b differ, or -1 (compare_buffers).
func firstDifference(a, b []byte) int64 {
	for i := 0; i < len(a); i += sectorSize {
		end := min(i+sectorSize, len(a))
		if !bytes.Equal(a[i:end], b[i:end]) {
			return int64(i)
		}
	}
	return -1
}

// compareStatus is bdrv_block_status_above over the whole chain: the
// status bits of the run at off and its length.
func compareStatus(img formats.Image, off, length int64) (int, int64, error) {
	ce, err := chainStatus(img, off, length)
	if err != nil {
		return 0, 0, err
	}
	s := 0
	if ce.Status&formats.StatusData != 0 {
		s |= bsData
	}
	if ce.Status&formats.StatusZero != 0 {
		s |= bsZero
	}
	if ce.Status&formats.StatusOffsetValid != 0 {
		s |= bsOffsetValid
	}
	// Zeroes past the end of a shorter backing image count as allocated
	// there; below an image without backing they are not allocated.
	if ce.Present || pastBackingEnd(img, ce.Depth) {
		s |= bsAllocated
	}
	if off+ce.Length == img.Size() {
		s |= bsEOF
	}
	return s, ce.Length, nil
}

// pastBackingEnd reports whether the image depth levels down the chain
// has a backing image, i.e. an unallocated run that ChainStatus ended
// there lies past that backing image's end.
func pastBackingEnd(img formats.Image, depth int) bool {
	for ; img != nil; depth-- {
		b, ok := img.(formats.Backed)
		if !ok {
			return false
		}
		if depth == 0 {
			return b.Backing() != nil
		}
		img = b.Backing()
	}
	return false
}
