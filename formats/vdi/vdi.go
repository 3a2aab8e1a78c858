// Package vdi is VirtualBox's VDI image format, version 1.1, as QEMU's
// block/vdi.c reads and writes it: a 512-byte header, a block map of
// 32-bit entries, and 1 MiB blocks. Dynamic images allocate blocks on
// first write, one after the other; static images have every block
// allocated at creation. Images with a link or parent UUID (VirtualBox
// differencing images and snapshots) are refused, as QEMU refuses them.
package vdi

import (
	"encoding/binary"
	"fmt"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "vdi",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
	})
}

// probe is vdi_probe: the signature after the text line decides.
func probe(buf []byte, _ string) int {
	if len(buf) >= headerSize && binary.LittleEndian.Uint32(buf[0x40:]) == signature {
		return 100
	}
	return 0
}

// Image is an open VDI image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	size     int64
	static   bool
	dataOff  int64
	bmapOff  int64

	// mu guards hdr and bmap: lookups hold it shared; allocating writes
	// hold it exclusively while they write the new block, the header and
	// the block map, so a partial write of a block never races the
	// whole-block write that allocates it.
	mu   sync.RWMutex
	hdr  *Header
	bmap []uint32
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
	_ formats.Checker   = (*Image)(nil)
)

// open is vdi_open: check the header and load the block map.
func open(f *formats.File, _ *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func load(f *formats.File) (*Image, error) {
	buf := make([]byte, headerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	h := decodeHeader(buf)
	if err := h.validate(); err != nil {
		return nil, err
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	img := &Image{
		f:        f,
		readOnly: f.ReadOnly(),
		size:     int64((h.DiskSize + sectorSize - 1) &^ (sectorSize - 1)),
		static:   h.ImageType == typeStatic,
		dataOff:  int64(h.OffsetData),
		bmapOff:  int64(h.OffsetBmap),
		hdr:      h,
	}
	// QEMU reads a block map past the end of the file as zeroes (every
	// block at index 0); imgfs refuses that, which also bounds the map by
	// the file.
	n := h.bmapBytes()
	if img.bmapOff+n > fileSize {
		return nil, fmt.Errorf("VDI block map [%d, +%d) extends past the end of the file (%d bytes): %w",
			img.bmapOff, n, fileSize, formats.ErrCorrupt)
	}
	raw := make([]byte, n)
	if _, err := f.ReadAt(raw, img.bmapOff); err != nil {
		return nil, err
	}
	img.bmap = make([]uint32, h.BlocksInImage)
	for i := range img.bmap {
		img.bmap[i] = binary.LittleEndian.Uint32(raw[4*i:])
	}
	return img, nil
}

func (img *Image) Size() int64      { return img.size }
func (img *Image) Format() string   { return "vdi" }
func (img *Image) Filename() string { return img.f.Name() }

// errIO is what QEMU reports for a request outside the image.
var errIO = formats.ErrnoError{Err: syscall.EIO}

// hostOffset is where guest offset off lives, or -1 when its block is not
// allocated. The caller holds mu.
func (img *Image) hostOffset(off int64) int64 {
	e := img.bmap[off/blockSize]
	if !allocated(e) {
		return -1
	}
	return img.dataOff + int64(e)*blockSize + off%blockSize
}

// ReadAt reads guest bytes; unallocated and discarded blocks read as
// zeroes.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	return formats.ReadBlocks(img.f.Name(), p, off, img.size, blockSize, func(q []byte, pos int64) (int, error) {
		img.mu.RLock()
		host := img.hostOffset(pos)
		img.mu.RUnlock()
		if host < 0 {
			clear(q)
			return len(q), nil
		}
		return img.f.ReadAt(q, host)
	})
}

// WriteAt writes guest bytes. A write that does not fit in Size fails as
// a whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.readOnly {
		return 0, formats.ErrReadOnly
	}
	return formats.WriteBlocks(img.f.Name(), p, off, img.size, blockSize, func(q []byte, pos int64) error {
		img.mu.RLock()
		host := img.hostOffset(pos)
		img.mu.RUnlock()
		if host < 0 {
			return img.allocate(pos, q)
		}
		_, err := img.f.WriteAt(q, host)
		return err
	})
}

// allocate writes data at guest offset off into a new block, as
// vdi_co_pwritev does: the block goes at index blocks_allocated, is
// written whole (zeroes around the data), then the header with the new
// count and the block map sector are written. data does not cross a
// block boundary.
func (img *Image) allocate(off int64, data []byte) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	idx := off / blockSize
	if host := img.hostOffset(off); host >= 0 {
		// Another writer allocated the block meanwhile.
		_, err := img.f.WriteAt(data, host)
		return err
	}
	n := img.hdr.BlocksAllocated
	if n >= img.hdr.BlocksInImage {
		return fmt.Errorf("%s: header counts %d allocated blocks of %d, none left to allocate: %w",
			img.f.Name(), n, img.hdr.BlocksInImage, formats.ErrCorrupt)
	}
	block := make([]byte, blockSize)
	copy(block[off%blockSize:], data)
	if _, err := img.f.WriteAt(block, img.dataOff+int64(n)*blockSize); err != nil {
		return err
	}
	img.bmap[idx] = n
	img.hdr.BlocksAllocated = n + 1
	if _, err := img.f.WriteAt(img.hdr.encode(), 0); err != nil {
		return err
	}
	// The block map is written in whole sectors.
	first := idx &^ (sectorSize/4 - 1)
	end := min(first+sectorSize/4, int64(len(img.bmap)))
	sector := make([]byte, sectorSize)
	for i := first; i < end; i++ {
		binary.LittleEndian.PutUint32(sector[4*(i-first):], img.bmap[i])
	}
	if end-first < sectorSize/4 {
		// The padding of the last sector keeps what the file holds.
		if _, err := img.f.ReadAt(sector[4*(end-first):], img.bmapOff+4*end); err != nil {
			return err
		}
	}
	_, err := img.f.WriteAt(sector, img.bmapOff+4*first)
	return err
}

// BlockStatus is vdi_co_block_status: allocated blocks are data at their
// host offset (in a static image, holes of the host file read as
// zeroes), unallocated ones read as zeroes. Runs of blocks with the same
// status merge, allocated ones while their host offsets are contiguous.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w", img.f.Name(), length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	host, n := formats.MappedRun(off, length, blockSize, img.hostOffset)
	if host < 0 {
		return formats.Extent{Length: n, Status: formats.StatusZero}, nil
	}
	e := formats.Extent{Length: n, Status: formats.StatusData | formats.StatusOffsetValid, Offset: host, File: img.f.Name()}
	if img.static {
		// BDRV_BLOCK_RECURSE: QEMU asks the host file too.
		e = formats.WithHostHoles(img.f, e)
	}
	return e, nil
}

// Describe reports the block size as the cluster size and the dirty flag
// QEMU always reports as false.
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{ClusterSize: blockSize, HasDirtyFlag: true}, nil
}

// Flush makes completed writes durable.
func (img *Image) Flush() error { return img.f.Sync() }

// Close closes the file.
func (img *Image) Close() error { return img.f.Close() }
