package vpc

import (
	"bytes"
	"encoding/binary"
)

// On-disk constants of the VHD format (Microsoft's "Virtual Hard Disk
// Image Format Specification"; QEMU's block/vpc.c).
const (
	footerSize    = 512
	dynHeaderSize = 1024

	diskFixed   = 2
	diskDynamic = 3

	// unallocated is a BAT entry without a block.
	unallocated = 0xffffffff

	// timestampBase is 2000-01-01 00:00:00 UTC, the VHD epoch.
	timestampBase = 946684800

	// maxGeometry is the largest CHS geometry (65535 x 16 x 255 sectors).
	// An image with it takes its size from the footer's current size.
	maxGeometry = 65535 * 16 * 255
	// maxSectors is QEMU's limit of 2040 GiB.
	maxSectors = 0xff000000

	// defaultBlockSize is the block size of dynamic images QEMU creates.
	defaultBlockSize = 2 << 20
)

var (
	footerMagic    = []byte("conectix")
	dynHeaderMagic = []byte("cxsparse")
)

// Footer is the 512-byte hard disk footer, at the end of every image
// and, for dynamic images, copied at the start.
type Footer struct {
	Cookie      [8]byte
	Features    uint32
	Version     uint32
	DataOffset  uint64 // the dynamic disk header; all ones for fixed disks
	Timestamp   uint32
	CreatorApp  [4]byte
	Major       uint16
	Minor       uint16
	CreatorOS   [4]byte
	OrigSize    uint64
	CurrentSize uint64
	Cylinders   uint16
	Heads       uint8
	SecsPerCyl  uint8
	DiskType    uint32
	Checksum    uint32
	UUID        [16]byte
	SavedState  uint8
	// Reserved holds the rest of the sector, kept as it was read so
	// that a rewritten footer keeps its checksum.
	Reserved [427]byte
}

// decodeFooter parses a footer sector; buf holds footerSize bytes.
func decodeFooter(buf []byte) *Footer {
	be := binary.BigEndian
	f := &Footer{
		Features:    be.Uint32(buf[8:]),
		Version:     be.Uint32(buf[12:]),
		DataOffset:  be.Uint64(buf[16:]),
		Timestamp:   be.Uint32(buf[24:]),
		Major:       be.Uint16(buf[32:]),
		Minor:       be.Uint16(buf[34:]),
		OrigSize:    be.Uint64(buf[40:]),
		CurrentSize: be.Uint64(buf[48:]),
		Cylinders:   be.Uint16(buf[56:]),
		Heads:       buf[58],
		SecsPerCyl:  buf[59],
		DiskType:    be.Uint32(buf[60:]),
		Checksum:    be.Uint32(buf[64:]),
		SavedState:  buf[84],
	}
	copy(f.Cookie[:], buf[0:8])
	copy(f.CreatorApp[:], buf[28:32])
	copy(f.CreatorOS[:], buf[36:40])
	copy(f.UUID[:], buf[68:84])
	copy(f.Reserved[:], buf[85:footerSize])
	return f
}

// encode returns the footer sector with the stored checksum.
func (f *Footer) encode() []byte {
	be := binary.BigEndian
	buf := make([]byte, footerSize)
	copy(buf[0:8], f.Cookie[:])
	be.PutUint32(buf[8:], f.Features)
	be.PutUint32(buf[12:], f.Version)
	be.PutUint64(buf[16:], f.DataOffset)
	be.PutUint32(buf[24:], f.Timestamp)
	copy(buf[28:32], f.CreatorApp[:])
	be.PutUint16(buf[32:], f.Major)
	be.PutUint16(buf[34:], f.Minor)
	copy(buf[36:40], f.CreatorOS[:])
	be.PutUint64(buf[40:], f.OrigSize)
	be.PutUint64(buf[48:], f.CurrentSize)
	be.PutUint16(buf[56:], f.Cylinders)
	buf[58] = f.Heads
	buf[59] = f.SecsPerCyl
	be.PutUint32(buf[60:], f.DiskType)
	be.PutUint32(buf[64:], f.Checksum)
	copy(buf[68:84], f.UUID[:])
	buf[84] = f.SavedState
	copy(buf[85:], f.Reserved[:])
	return buf
}

// checksum is the one's complement of the byte sum of the
// encoded structure with its checksum field zeroed.
func checksum(buf []byte, field int) uint32 {
	var sum uint32
	for i, b := range buf {
		if i < field || i >= field+4 {
			sum += uint32(b)
		}
	}
	return ^sum
}

// footerChecksum is the checksum the footer should carry.
func (f *Footer) footerChecksum() uint32 { return checksum(f.encode(), 64) }

// geometrySectors is the size the CHS geometry describes, in sectors.
func (f *Footer) geometrySectors() int64 {
	return int64(f.Cylinders) * int64(f.Heads) * int64(f.SecsPerCyl)
}

// sizeFromCurrentSize reports whether the creator application sizes the
// disk by the footer's current size rather than by its CHS geometry, as
// QEMU 7.2 decides it: Hyper-V ("win "), QEMU with force_size ("qem2"),
// Disk2vhd ("d2v "), XenConverter ("CTXS") and XenServer ("tap\0") do;
// Virtual PC, older QEMU and every other creator do not.
func (f *Footer) sizeFromCurrentSize() bool {
	for _, app := range []string{"win ", "qem2", "d2v ", "CTXS", "tap\x00"} {
		if string(f.CreatorApp[:]) == app {
			return true
		}
	}
	return false
}

// virtualSectors is the guest size in sectors as vpc_open computes it:
// the geometry, unless the creator uses the current size (calc may
// override the creator either way) or the geometry is the largest one
// (which cannot describe the disk, whatever calc says).
func (f *Footer) virtualSectors(calc sizeCalc) int64 {
	n := f.geometrySectors()
	useCHS := calc == sizeCHS || calc == sizeAuto && !f.sizeFromCurrentSize()
	if !useCHS || n == maxGeometry {
		n = int64(f.CurrentSize / 512)
	}
	return n
}

// DynHeader is the 1024-byte dynamic disk header.
type DynHeader struct {
	Cookie          [8]byte
	DataOffset      uint64
	TableOffset     uint64 // the BAT
	HeaderVersion   uint32
	MaxTableEntries uint32
	BlockSize       uint32
	Checksum        uint32
	// Rest holds the parent fields and locators, which imgfs does not
	// interpret (differencing disks are not supported, as in QEMU).
	Rest [dynHeaderSize - 40]byte
}

func decodeDynHeader(buf []byte) *DynHeader {
	be := binary.BigEndian
	h := &DynHeader{
		DataOffset:      be.Uint64(buf[8:]),
		TableOffset:     be.Uint64(buf[16:]),
		HeaderVersion:   be.Uint32(buf[24:]),
		MaxTableEntries: be.Uint32(buf[28:]),
		BlockSize:       be.Uint32(buf[32:]),
		Checksum:        be.Uint32(buf[36:]),
	}
	copy(h.Cookie[:], buf[0:8])
	copy(h.Rest[:], buf[40:dynHeaderSize])
	return h
}

func (h *DynHeader) encode() []byte {
	be := binary.BigEndian
	buf := make([]byte, dynHeaderSize)
	copy(buf[0:8], h.Cookie[:])
	be.PutUint64(buf[8:], h.DataOffset)
	be.PutUint64(buf[16:], h.TableOffset)
	be.PutUint32(buf[24:], h.HeaderVersion)
	be.PutUint32(buf[28:], h.MaxTableEntries)
	be.PutUint32(buf[32:], h.BlockSize)
	be.PutUint32(buf[36:], h.Checksum)
	copy(buf[40:], h.Rest[:])
	return buf
}

func isFooter(buf []byte) bool { return bytes.Equal(buf[:8], footerMagic) }

// geometry is the VHD specification's CHS calculation for a sector
// count (QEMU's calculate_geometry, which allows 255 sectors per track
// with 16 heads beyond the ATA limit). The result may describe fewer
// sectors than asked for.
func geometry(sectors int64) (cyls uint16, heads, secs uint8) {
	sectors = min(sectors, maxGeometry)
	var cth uint32 // cylinders times heads
	if sectors >= 65535*16*63 {
		secs, heads = 255, 16
		cth = uint32(sectors / 255)
	} else {
		secs = 17
		cth = uint32(sectors / 17)
		// QEMU keeps the head count in a byte; the truncation decides
		// which branch large sizes take, so it is kept.
		heads = uint8((cth + 1023) / 1024)
		if heads < 4 {
			heads = 4
		}
		if cth >= uint32(heads)*1024 || heads > 16 {
			secs, heads = 31, 16
			cth = uint32(sectors / 31)
		}
		if cth >= uint32(heads)*1024 {
			secs, heads = 63, 16
			cth = uint32(sectors / 63)
		}
	}
	return uint16(cth / uint32(heads)), heads, secs
}
