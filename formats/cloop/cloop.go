// Package cloop reads Linux compressed loopback images (cloop version
// 2.0) as QEMU 7.2's block/cloop.c does: a shell-script header, the
// block size and count (big-endian), a table of n+1 big-endian file
// offsets, and blocks each compressed separately with zlib. The format is
// read-only.
package cloop

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

const (
	magic = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
	// headerSize is where the block size and count follow the script.
	headerSize = 128
	// maxBlockSize bounds the block size (QEMU's MAX_BLOCK_SIZE).
	maxBlockSize = 64 << 20
	// maxOffsets bounds the offset table (QEMU allows 512 MiB of it).
	maxOffsetsSize = 512 << 20
	sectorSize     = 512
)

func init() {
	formats.Register(&formats.Driver{
		Name:     "cloop",
		Probe:    probe,
		Open:     open,
		ReadOnly: true,
	})
}

// probe is cloop_probe: the version 2.0 script, scored low as QEMU does.
func probe(buf []byte, _ string) int {
	if bytes.HasPrefix(buf, []byte(magic)) {
		return 2
	}
	return 0
}

// Image is an open cloop image. It is safe for concurrent use.
type Image struct {
	formats.ReadOnlyBase
	blockSize int64
	offsets   []uint64

	// mu guards the cache of the last block read: sequential reads hit
	// one block many times.
	mu        sync.Mutex
	cached    int64
	cacheData []byte
}

var _ formats.Image = (*Image)(nil)

// errIO is what QEMU reports for a request outside the image or a block
// that does not decompress.
var errIO = formats.ErrnoError{Err: syscall.EIO}

func open(f *formats.File, _ *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// load is cloop_open.
func load(f *formats.File) (*Image, error) {
	var hdr [8]byte
	if _, err := f.ReadAt(hdr[:], headerSize); err != nil {
		return nil, err
	}
	bs := binary.BigEndian.Uint32(hdr[:])
	n := binary.BigEndian.Uint32(hdr[4:])
	switch {
	case bs%sectorSize != 0:
		return nil, formats.Errorf(formats.ErrCorrupt, "block_size %d must be a multiple of 512", bs)
	case bs == 0:
		return nil, formats.Errorf(formats.ErrCorrupt, "block_size cannot be zero")
	case bs > maxBlockSize:
		// QEMU says "64 MB"
		return nil, formats.Errorf(formats.ErrUnsupported, "block_size %d must be %d MB or less", bs, maxBlockSize/(1<<20))
	}
	if uint64(n) > math.MaxUint32/8-1 {
		return nil, formats.Errorf(formats.ErrCorrupt, "n_blocks %d must be %d or less", n, math.MaxUint32/8-1)
	}
	tableSize := (int64(n) + 1) * 8
	if tableSize > maxOffsetsSize {
		return nil, formats.Errorf(formats.ErrUnsupported, "image requires too many offsets, try increasing block size")
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	// Bound the table by the file before allocating it.
	if headerSize+8+tableSize > fileSize {
		return nil, fmt.Errorf("%s: cloop offset table of %d entries extends past the end of the file (%d bytes): %w",
			f.Name(), n+1, fileSize, formats.ErrCorrupt)
	}
	raw := make([]byte, tableSize)
	if _, err := f.ReadAt(raw, headerSize+8); err != nil {
		return nil, err
	}
	img := &Image{ReadOnlyBase: formats.ReadOnlyBase{File: f, VirtualSize: int64(n) * int64(bs)}, blockSize: int64(bs), offsets: make([]uint64, n+1), cached: -1}
	for i := range img.offsets {
		img.offsets[i] = binary.BigEndian.Uint64(raw[8*i:])
		if i == 0 {
			continue
		}
		if img.offsets[i] < img.offsets[i-1] {
			return nil, formats.Errorf(formats.ErrCorrupt, "offsets not monotonically increasing at index %d, image file is corrupt", i)
		}
		// A compressed block is at most the block plus zlib's overhead.
		if img.offsets[i]-img.offsets[i-1] > 2*maxBlockSize {
			return nil, formats.Errorf(formats.ErrCorrupt, "invalid compressed block size at index %d, image file is corrupt", i)
		}
	}
	return img, nil
}

func (img *Image) Format() string { return "cloop" }

// block returns the decompressed block i. The caller holds mu.
func (img *Image) block(i int64) ([]byte, error) {
	if img.cached == i {
		return img.cacheData, nil
	}
	start, end := img.offsets[i], img.offsets[i+1]
	comp := make([]byte, end-start)
	// A block past the end of the file reads as zeroes and fails to
	// inflate below.
	if _, err := img.File.ReadAt(comp, int64(start)); err != nil {
		return nil, err
	}
	if img.cacheData == nil {
		img.cacheData = make([]byte, img.blockSize)
	}
	img.cached = -1
	if err := inflate(img.cacheData, comp); err != nil {
		return nil, fmt.Errorf("%s: cloop block %d: %v: %w", img.File.Name(), i, err, errIO)
	}
	img.cached = i
	return img.cacheData, nil
}

// inflate decompresses one zlib stream of exactly len(dst) bytes.
func inflate(dst, src []byte) error {
	zr, err := zlib.NewReader(bytes.NewReader(src))
	if err != nil {
		return err
	}
	if _, err := io.ReadFull(zr, dst); err != nil {
		return err
	}
	// The stream must end here: QEMU wants Z_STREAM_END with exactly the
	// block size out.
	var one [1]byte
	if n, err := zr.Read(one[:]); n != 0 || err != io.EOF {
		return fmt.Errorf("block decompresses to more than %d bytes", len(dst))
	}
	return nil
}

// ReadAt reads guest bytes.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	return formats.ReadBlocks(img.File.Name(), p, off, img.VirtualSize, img.blockSize, func(q []byte, pos int64) (int, error) {
		b, err := img.block(pos / img.blockSize)
		if err != nil {
			return 0, err
		}
		return copy(q, b[pos%img.blockSize:]), nil
	})
}
