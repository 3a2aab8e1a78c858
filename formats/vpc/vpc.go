// Package vpc is the VHD image format of Connectix / Microsoft Virtual
// PC, which QEMU calls "vpc" (block/vpc.c). Fixed disks are the guest
// bytes followed by a 512-byte footer; dynamic disks start with a copy of
// the footer, then a dynamic disk header, a block allocation table (BAT)
// and blocks, each preceded by its sector bitmap, with the footer at the
// end. Differencing disks are not supported, as in QEMU.
package vpc

import (
	"encoding/binary"
	"fmt"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&formats.Driver{
		Name:           "vpc",
		Probe:          probe,
		Open:           open,
		Create:         create,
		CreateOptions:  createOptions,
		RuntimeOptions: runtimeOptions,
	})
}

// runtimeOptions are vpc_runtime_opts: force_size_calc overrides the
// creator application's say in how the disk is sized.
var runtimeOptions = []formats.OptionSpec{
	{Name: "force_size_calc", Type: formats.OptString, Strong: true,
		Help: "Force disk size calculation to use either CHS geometry, or use the disk current_size specified in the VHD footer. {chs, current_size}"},
}

// sizeCalc is a force_size_calc mode.
type sizeCalc int

const (
	sizeAuto        sizeCalc = iota // by the creator application
	sizeCHS                         // the geometry, unless it is the largest
	sizeCurrentSize                 // the footer's current size
)

// parseSizeCalc is vpc_parse_options.
func parseSizeCalc(o *formats.OpenOptions) (sizeCalc, error) {
	rt, err := o.RuntimeValues(runtimeOptions)
	if err != nil {
		return 0, err
	}
	if !rt.Has("force_size_calc") {
		return sizeAuto, nil
	}
	switch v := rt.String("force_size_calc"); v {
	case "chs":
		return sizeCHS, nil
	case "current_size":
		return sizeCurrentSize, nil
	default:
		return 0, fmt.Errorf("Invalid size calculation mode: '%s'", v)
	}
}

// probe recognises the footer copy at the start of a dynamic disk. A
// fixed disk starts with guest data, so QEMU (and imgfs) probe it as raw.
func probe(buf []byte, _ string) int {
	if len(buf) >= 8 && isFooter(buf) {
		return 100
	}
	return 0
}

// maxTableEntries bounds the BAT imgfs loads: 32M entries (128 MiB) map
// 64 TiB with QEMU's 2 MiB blocks, far beyond VHD's 2040 GiB limit, and
// keep a hostile header from making imgfs allocate gigabytes.
const maxTableEntries = 32 << 20

// Image is an open VHD image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	fixed    bool // footer type 2: guest data is the file itself
	size     int64
	footer   *Footer

	// Dynamic disks only; blockSize and bitmapSize are fixed at open.
	blockSize  int64
	bitmapSize int64
	batOffset  int64

	// mu guards bat, freeOffset and lastBitmap: reads hold it shared to
	// look up blocks, writes exclusively to allocate them.
	mu  sync.RWMutex
	bat []uint32
	// freeOffset is where the next block goes and where the footer is.
	freeOffset int64
	// lastBitmap is the bitmap last set to all ones, which QEMU does
	// before writing to a block (see markBitmap).
	lastBitmap int64
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
)

// open is vpc_open: find the footer (at the start for dynamic disks, at
// the end for fixed ones), verify its checksum, size the disk and, for
// dynamic disks, load the BAT.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	calc, err := parseSizeCalc(o)
	if err != nil {
		f.Close()
		return nil, err
	}
	img, err := load(f, calc)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func load(f *formats.File, calc sizeCalc) (*Image, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("Invalid file size: %w", formats.ErrnoError{Err: err})
	}
	buf := make([]byte, footerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, fmt.Errorf("Unable to read VHD header: %w", err)
	}
	atEnd := false
	if !isFooter(buf) {
		// QEMU sees the file's length in whole sectors, so only an
		// empty file is too small, and the footer of a file whose
		// length is not whole sectors is looked for in its last,
		// partial sector.
		end := (fileSize + 511) &^ 511
		if end < footerSize {
			return nil, formats.Errorf(formats.ErrWrongFormat, "File too small for a VHD header")
		}
		if _, err := f.ReadAt(buf, end-footerSize); err != nil {
			return nil, err
		}
		if !isFooter(buf) {
			return nil, formats.Errorf(formats.ErrWrongFormat, "invalid VPC image")
		}
		atEnd = true
	}
	ft := decodeFooter(buf)
	if ft.footerChecksum() != ft.Checksum {
		return nil, formats.Errorf(formats.ErrCorrupt, "Incorrect header checksum")
	}
	img := &Image{f: f, readOnly: f.ReadOnly(), footer: ft, fixed: ft.DiskType == diskFixed, lastBitmap: -1}
	sectors := ft.virtualSectors(calc)
	if sectors > maxSectors {
		// QEMU reports a bare errno here, which its open wrapper words
		// "Could not open NAME" before qemu-img adds that again.
		return nil, formats.Errorf(formats.ErrUnsupported, "Could not open '%s': %s", f.Name(), formats.ErrnoError{Err: syscall.EFBIG})
	}
	img.size = sectors * 512
	if atEnd {
		// QEMU reads a footer found at the end as a fixed disk whatever
		// its type says; a dynamic type there would leave it without a
		// block table, so imgfs refuses it.
		if !img.fixed {
			return nil, formats.Errorf(formats.ErrCorrupt, "VHD footer at the end of the file has disk type %d, not fixed", ft.DiskType)
		}
		return img, nil
	}
	if err := img.loadDynamic(fileSize); err != nil {
		return nil, err
	}
	return img, nil
}

// loadDynamic reads the dynamic disk header and the BAT with vpc_open's
// checks and messages.
func (img *Image) loadDynamic(fileSize int64) error {
	ft := img.footer
	if ft.DataOffset > 1<<62 {
		return formats.Errorf(formats.ErrCorrupt, "Error reading dynamic VHD header")
	}
	buf := make([]byte, dynHeaderSize)
	// QEMU reads only the first sector; the rest (parent locators) is
	// read here too so the header can be kept whole, and reads as
	// zeroes past the end of the file.
	if _, err := img.f.ReadAt(buf, int64(ft.DataOffset)); err != nil {
		return fmt.Errorf("Error reading dynamic VHD header: %w", err)
	}
	dh := decodeDynHeader(buf)
	if string(dh.Cookie[:]) != string(dynHeaderMagic) {
		return formats.Errorf(formats.ErrCorrupt, "Invalid header magic")
	}
	bs := dh.BlockSize
	if bs < 512 || bs&(bs-1) != 0 {
		return formats.Errorf(formats.ErrCorrupt, "Invalid block size %d", bs)
	}
	img.blockSize = int64(bs)
	img.bitmapSize = (img.blockSize/(8*512) + 511) &^ 511
	// QEMU holds the entry count in an int.
	entries := int32(dh.MaxTableEntries)
	if img.size/img.blockSize > 0xffffffff {
		return formats.Errorf(formats.ErrCorrupt, "Too many blocks")
	}
	if uint64(int64(entries))*uint64(bs) < uint64(img.size) {
		return formats.Errorf(formats.ErrCorrupt, "Page table too small")
	}
	if entries < 0 || entries > (1<<31-1)/4 {
		return formats.Errorf(formats.ErrCorrupt, "Max Table Entries too large (%d)", entries)
	}
	if entries > maxTableEntries {
		return formats.Errorf(formats.ErrUnsupported, "BAT of %d entries exceeds imgfs's limit of %d", entries, maxTableEntries)
	}
	if dh.TableOffset > 1<<62 {
		return formats.Errorf(formats.ErrCorrupt, "Error reading pagetable")
	}
	img.batOffset = int64(dh.TableOffset)
	tableBytes := int64(entries) * 4
	free := (img.batOffset + tableBytes + 511) &^ 511
	// The BAT must lie in the file: QEMU finds that out after reading
	// it (the block area starts behind it), imgfs before allocating.
	if free > fileSize {
		return errTruncated
	}
	raw := make([]byte, tableBytes)
	if _, err := img.f.ReadAt(raw, img.batOffset); err != nil {
		return fmt.Errorf("Error reading pagetable: %w", err)
	}
	img.bat = make([]uint32, entries)
	for i := range img.bat {
		e := binary.BigEndian.Uint32(raw[4*i:])
		img.bat[i] = e
		if e != unallocated {
			free = max(free, 512*int64(e)+img.bitmapSize+img.blockSize)
		}
	}
	if free > fileSize {
		return errTruncated
	}
	img.freeOffset = free
	return nil
}

var errTruncated = formats.Errorf(formats.ErrCorrupt,
	"block-vpc: free_data_block_offset points after the end of file. The image has been truncated.")

func (img *Image) Size() int64      { return img.size }
func (img *Image) Format() string   { return "vpc" }
func (img *Image) Filename() string { return img.f.Name() }

// errIO is what QEMU reports for a request outside the image.
var errIO = formats.ErrnoError{Err: syscall.EIO}

// blockOffset returns the host offset of guest offset off, or -1 when its
// block is not allocated. The caller holds mu.
func (img *Image) blockOffset(off int64) int64 {
	idx := off / img.blockSize
	if idx >= int64(len(img.bat)) || img.bat[idx] == unallocated {
		return -1
	}
	return 512*int64(img.bat[idx]) + img.bitmapSize + off%img.blockSize
}

// ReadAt reads guest bytes. Unallocated blocks of a dynamic disk read as
// zeroes; the sector bitmaps are not consulted, as in QEMU.
//
// A fixed disk has blockSize 0, so its reads and writes go in one piece
// to the same offset of the file.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	return formats.ReadBlocks(img.f.Name(), p, off, img.size, img.blockSize, func(q []byte, pos int64) (int, error) {
		host := pos
		if !img.fixed {
			img.mu.RLock()
			host = img.blockOffset(pos)
			img.mu.RUnlock()
		}
		if host < 0 {
			clear(q)
			return len(q), nil
		}
		return img.f.ReadAt(q, host)
	})
}

// WriteAt writes guest bytes; on a dynamic disk it allocates the blocks
// it touches. A write that does not fit in Size fails as a whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.readOnly {
		return 0, formats.ErrReadOnly
	}
	return formats.WriteBlocks(img.f.Name(), p, off, img.size, img.blockSize, func(q []byte, pos int64) error {
		host := pos
		if !img.fixed {
			var err error
			if host, err = img.hostForWrite(pos); err != nil {
				return err
			}
		}
		_, err := img.f.WriteAt(q, host)
		return err
	})
}

// hostForWrite returns the host offset for a write at guest offset off,
// allocating its block or marking its bitmap as needed.
func (img *Image) hostForWrite(off int64) (int64, error) {
	img.mu.RLock()
	host := img.blockOffset(off)
	marked := host >= 0 && img.lastBitmap == img.bitmapOf(off)
	img.mu.RUnlock()
	if marked {
		return host, nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if host = img.blockOffset(off); host < 0 {
		return img.allocate(off)
	}
	return host, img.markBitmap(img.bitmapOf(off))
}

// bitmapOf is the host offset of the bitmap of the allocated block
// holding off. The caller holds mu.
func (img *Image) bitmapOf(off int64) int64 { return 512 * int64(img.bat[off/img.blockSize]) }

// markBitmap sets every bit of a block's sector bitmap before data is
// written to it, as QEMU does: a block written by imgfs never hides
// sectors from Virtual PC, at the cost of its sparse-read optimisation.
// The caller holds mu exclusively.
func (img *Image) markBitmap(bitmap int64) error {
	if img.lastBitmap == bitmap {
		return nil
	}
	if err := img.writeSync(ones(img.bitmapSize), bitmap); err != nil {
		return err
	}
	img.lastBitmap = bitmap
	return nil
}

// allocate is alloc_block: the new block (bitmap, then data) goes where
// the footer is, the footer moves behind it, then the BAT entry is
// written, each step synced so that a crash leaves at worst an
// unreferenced block. The caller holds mu exclusively.
func (img *Image) allocate(off int64) (int64, error) {
	idx := off / img.blockSize
	bitmap := img.freeOffset
	if bitmap/512 >= unallocated {
		return 0, formats.Errorf(formats.ErrUnsupported, "%s: no room for another block: the BAT addresses only 2 TiB", img.f.Name())
	}
	if err := img.writeSync(ones(img.bitmapSize), bitmap); err != nil {
		return 0, err
	}
	next := bitmap + img.bitmapSize + img.blockSize
	if err := img.writeSync(img.footer.encode(), next); err != nil {
		return 0, err
	}
	var entry [4]byte
	binary.BigEndian.PutUint32(entry[:], uint32(bitmap/512))
	if err := img.writeSync(entry[:], img.batOffset+4*idx); err != nil {
		return 0, err
	}
	img.bat[idx] = uint32(bitmap / 512)
	img.freeOffset = next
	return img.blockOffset(off), nil
}

// writeSync writes metadata and makes it durable (bdrv_pwrite_sync).
func (img *Image) writeSync(p []byte, off int64) error {
	if _, err := img.f.WriteAt(p, off); err != nil {
		return err
	}
	return img.f.Sync()
}

func ones(n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 0xff
	}
	return b
}

// BlockStatus is vpc_co_block_status. A fixed disk is data at the same
// offset in the file, where holes of the host file read as zeroes. A
// dynamic disk reports an allocated block up to its end (the next one
// lies behind a bitmap) and runs of unallocated blocks as zeroes.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w", img.f.Name(), length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	if img.fixed {
		e := formats.Extent{Length: length, Status: formats.StatusData | formats.StatusOffsetValid, Offset: off, File: img.f.Name()}
		return formats.WithHostHoles(img.f, e), nil
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	if host := img.blockOffset(off); host >= 0 {
		n := min(length, img.blockSize-off%img.blockSize)
		return formats.Extent{Length: n, Status: formats.StatusData | formats.StatusOffsetValid, Offset: host, File: img.f.Name()}, nil
	}
	n := int64(0)
	for n < length && img.blockOffset(off+n) < 0 {
		n += min(length-n, img.blockSize-(off+n)%img.blockSize)
	}
	return formats.Extent{Length: n, Status: formats.StatusZero}, nil
}

// Describe reports what qemu-img info shows: a dynamic disk's block size
// as its cluster size, and the dirty flag QEMU always reports as false.
func (img *Image) Describe() (*formats.Description, error) {
	d := &formats.Description{HasDirtyFlag: true}
	if !img.fixed {
		d.ClusterSize = img.blockSize
	}
	return d, nil
}

// Flush makes completed writes durable.
func (img *Image) Flush() error { return img.f.Sync() }

// Close closes the file.
func (img *Image) Close() error { return img.f.Close() }
