// Package bochs reads Bochs growing ("Redolog"/"Growing") disk images as
// QEMU 7.2's block/bochs.c does: a 512-byte header, a catalog of 32-bit
// extent indexes, and per allocated extent a bitmap of its sectors
// followed by the sectors. The format is read-only.
package bochs

import (
	"bytes"
	"encoding/binary"
	"math/bits"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

const (
	magic       = "Bochs Virtual HD Image"
	typeRedolog = "Redolog"
	typeGrowing = "Growing"
	version2    = 0x00020000
	version1    = 0x00010000
	headerSize  = 512
	sectorSize  = 512
	// maxCatalog bounds the catalog as QEMU does: 1M entries are what the
	// largest image bximage makes needs.
	maxCatalog = 0x100000
	maxExtent  = 0x800000
	// unallocated marks a catalog entry without an extent.
	unallocated = 0xffffffff
)

func init() {
	formats.Register(&formats.Driver{
		Name:     "bochs",
		Probe:    probe,
		Open:     open,
		ReadOnly: true,
	})
}

// cstr is a NUL-terminated string field.
func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// valid reports whether a header names a growing redolog of a known
// version (bochs_probe's test).
func valid(buf []byte) bool {
	if len(buf) < headerSize {
		return false
	}
	v := binary.LittleEndian.Uint32(buf[64:])
	return cstr(buf[:32]) == magic && cstr(buf[32:48]) == typeRedolog &&
		cstr(buf[48:64]) == typeGrowing && (v == version2 || v == version1)
}

func probe(buf []byte, _ string) int {
	if valid(buf) {
		return 100
	}
	return 0
}

// Image is an open Bochs image. It is safe for concurrent use: it keeps
// no mutable state.
type Image struct {
	formats.ReadOnlyBase
	catalog      []uint32
	dataOffset   int64
	bitmapBlocks int64
	extentBlocks int64
	extentSize   int64
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
)

var errIO = formats.ErrnoError{Err: syscall.EIO}

func open(f *formats.File, _ *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// load is bochs_open.
func load(f *formats.File) (*Image, error) {
	buf := make([]byte, headerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	if !valid(buf) {
		return nil, formats.Errorf(formats.ErrWrongFormat, "Image not in Bochs format")
	}
	le := binary.LittleEndian
	hdrLen := int64(le.Uint32(buf[68:]))
	catalog := le.Uint32(buf[72:])
	bitmap := le.Uint32(buf[76:])
	extent := le.Uint32(buf[80:])
	// Version 1 has the disk size where version 2 has a reserved word.
	disk := le.Uint64(buf[88:])
	if le.Uint32(buf[64:]) == version1 {
		disk = le.Uint64(buf[84:])
	}
	if catalog > maxCatalog {
		return nil, formats.Errorf(formats.ErrUnsupported, "Catalog size is too large")
	}
	switch {
	case extent < sectorSize:
		return nil, formats.Errorf(formats.ErrCorrupt, "Extent size must be at least 512")
	case bits.OnesCount32(extent) != 1:
		return nil, formats.Errorf(formats.ErrCorrupt, "Extent size %d is not a power of two", extent)
	case extent > maxExtent:
		return nil, formats.Errorf(formats.ErrUnsupported, "Extent size %d is too large", extent)
	}
	sectors := int64(disk / sectorSize)
	perExtent := int64(extent / sectorSize)
	if int64(catalog) < (sectors+perExtent-1)/perExtent {
		return nil, formats.Errorf(formats.ErrCorrupt, "Catalog size is too small for this disk size")
	}
	img := &Image{
		ReadOnlyBase: formats.ReadOnlyBase{File: f, VirtualSize: sectors * sectorSize},
		catalog:      make([]uint32, catalog),
		dataOffset:   hdrLen + 4*int64(catalog),
		bitmapBlocks: 1 + (int64(bitmap)-1)/sectorSize,
		extentBlocks: 1 + (int64(extent)-1)/sectorSize,
		extentSize:   int64(extent),
	}
	// Bounded by maxCatalog; past the end of the file the catalog reads
	// as zeroes, as in QEMU.
	raw := make([]byte, 4*int64(catalog))
	if _, err := f.ReadAt(raw, hdrLen); err != nil {
		return nil, err
	}
	for i := range img.catalog {
		img.catalog[i] = le.Uint32(raw[4*i:])
	}
	return img, nil
}

func (img *Image) Format() string { return "bochs" }

// sector returns the host offset of the guest sector at off, or -1 when
// the sector reads as zeroes: its extent or its bitmap bit is unset
// (seek_to_sector).
func (img *Image) sector(off int64) (int64, error) {
	inExtent := off % img.extentSize
	e := img.catalog[off/img.extentSize]
	if e == unallocated {
		return -1, nil
	}
	bitmapOff := img.dataOffset + sectorSize*(img.bitmapBlocks+img.extentBlocks)*int64(e)
	var b [1]byte
	if _, err := img.File.ReadAt(b[:], bitmapOff+inExtent/(sectorSize*8)); err != nil {
		return 0, err
	}
	if b[0]>>(inExtent/sectorSize%8)&1 == 0 {
		return -1, nil
	}
	return bitmapOff + sectorSize*(img.bitmapBlocks+inExtent/sectorSize), nil
}

// ReadAt reads guest bytes sector by sector.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	return formats.ReadBlocks(img.File.Name(), p, off, img.VirtualSize, sectorSize, func(q []byte, pos int64) (int, error) {
		host, err := img.sector(pos)
		if err != nil {
			return 0, err
		}
		if host < 0 {
			clear(q)
			return len(q), nil
		}
		return img.File.ReadAt(q, host+pos%sectorSize)
	})
}
