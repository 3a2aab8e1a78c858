package qcow2

import (
	"encoding/binary"
	"io"

	"github.com/imgfs/imgfs/formats"
)

// Bitmap directory entry flags and limits (docs/interop/qcow2.txt,
// "Bitmap directory").
const (
	BitmapInUse               = 1 << 0
	BitmapAuto                = 1 << 1
	BitmapExtraDataCompatible = 1 << 2
	bitmapReservedFlags       = ^uint32(BitmapInUse | BitmapAuto | BitmapExtraDataCompatible)

	bitmapEntryLen        = 24
	bitmapTypeDirty       = 1
	bitmapMinGranularity  = 9
	bitmapMaxGranularity  = 31
	bitmapMaxNameLen      = 1023
	bitmapMaxExtraDataLen = 1024
)

// BitmapEntry is one persistent dirty bitmap from the bitmap directory.
type BitmapEntry struct {
	TableOffset     uint64
	TableSize       uint32 // entries of the bitmap table
	Flags           uint32
	Type            uint8
	GranularityBits uint8
	Name            string
	Extra           []byte
	// DirOffset is where the entry starts within the directory.
	DirOffset uint64
}

// ReadBitmapDirectory reads and validates the bitmap directory that the
// bitmaps extension points to.
func ReadBitmapDirectory(r io.ReaderAt, h *Header) ([]BitmapEntry, error) {
	ext := h.Bitmaps
	if ext == nil {
		return nil, nil
	}
	// DirectorySize was bounded by decodeBitmapsExt.
	dir := make([]byte, ext.DirectorySize)
	if _, err := r.ReadAt(dir, int64(ext.DirectoryOff)); err != nil {
		return nil, errorf(formats.ErrCorrupt, "Failed to read bitmap directory: %v", err)
	}
	be := binary.BigEndian
	var out []BitmapEntry
	off := uint64(0)
	for i := uint32(0); i < ext.NbBitmaps; i++ {
		if uint64(len(dir))-off < bitmapEntryLen {
			return nil, errorf(formats.ErrCorrupt, "Bitmap directory is corrupted: entry %d at %d exceeds directory size %d", i, off, len(dir))
		}
		e := BitmapEntry{
			TableOffset:     be.Uint64(dir[off:]),
			TableSize:       be.Uint32(dir[off+8:]),
			Flags:           be.Uint32(dir[off+12:]),
			Type:            dir[off+16],
			GranularityBits: dir[off+17],
			DirOffset:       off,
		}
		nameLen := uint64(be.Uint16(dir[off+18:]))
		extraLen := uint64(be.Uint32(dir[off+20:]))
		if nameLen > bitmapMaxNameLen || extraLen > bitmapMaxExtraDataLen {
			return nil, errorf(formats.ErrCorrupt, "Bitmap directory is corrupted: entry %d name length %d, extra data %d", i, nameLen, extraLen)
		}
		n := (bitmapEntryLen + extraLen + nameLen + 7) &^ 7
		if uint64(len(dir))-off < n {
			return nil, errorf(formats.ErrCorrupt, "Bitmap directory is corrupted: entry %d at %d exceeds directory size %d", i, off, len(dir))
		}
		p := dir[off+bitmapEntryLen:]
		e.Extra = append([]byte(nil), p[:extraLen]...)
		e.Name = string(p[extraLen : extraLen+nameLen])
		if e.Type != bitmapTypeDirty || e.Flags&bitmapReservedFlags != 0 ||
			e.GranularityBits < bitmapMinGranularity || e.GranularityBits > bitmapMaxGranularity ||
			(extraLen != 0 && e.Flags&BitmapExtraDataCompatible == 0) {
			return nil, errorf(formats.ErrCorrupt, "Bitmap '%s' doesn't satisfy the constraints", e.Name)
		}
		out = append(out, e)
		off += n
	}
	return out, nil
}

// info renders the entry as a QAPI Qcow2BitmapInfo (name, granularity,
// flags), the flags in QEMU's order: in-use, then auto.
func (e *BitmapEntry) info() formats.Object {
	flags := []any{}
	if e.Flags&BitmapInUse != 0 {
		flags = append(flags, "in-use")
	}
	if e.Flags&BitmapAuto != 0 {
		flags = append(flags, "auto")
	}
	return formats.Object{
		{Key: "name", Value: e.Name},
		{Key: "granularity", Value: uint64(1) << e.GranularityBits},
		{Key: "flags", Value: flags},
	}
}
