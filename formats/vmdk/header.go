package vmdk

import (
	"encoding/binary"

	"github.com/imgfs/imgfs/formats"
)

// On-disk structures of sparse extents, as block/vmdk.c reads them. All
// fields are little-endian; the magic is compared as big-endian bytes.

const (
	magicCOWD = "COWD" // VMDK3 / VMFSSPARSE extents
	magicKDMV = "KDMV" // VMDK4 sparse extents (monolithicSparse, streamOptimized)

	sectorSize = 512
	// descSize is how much of the descriptor QEMU reads for the CID and
	// the parent hint (DESC_SIZE).
	descSize = 20 * sectorSize
	// maxDescRead bounds how much of a descriptor file is parsed
	// (vmdk_read_desc's avoid-unbounded-allocation limit).
	maxDescRead = 1<<20 - 1

	flagNLDetect  = 1 << 0
	flagRGD       = 1 << 1 // redundant grain directory present
	flagZeroGrain = 1 << 2 // GT entry 1 means "reads as zeroes"
	flagCompress  = 1 << 16
	flagMarker    = 1 << 17

	compressionDeflate = 1
	gdAtEnd            = ^uint64(0) // grain directory is in the footer
	gteZeroed          = 1

	// Sanity limits QEMU applies to headers (vmdk_open_vmdk4,
	// vmdk_add_extent).
	maxVersion       = 3
	maxGTEsPerGT     = 512
	maxGrainSectors  = 0x200000
	maxL1Entries     = 32 << 20
	maxExtentSectors = 1 << 32 // grain offsets are 32-bit sector numbers
	maxNesting       = 4       // descriptors inside sparse extents, recursively
	maxExtentFiles   = 4096    // extent files one image may open

	markerEOS    = 0
	markerFooter = 3
)

// header4 is the VMDK4 sparse extent header after the magic
// (VMDK4Header, packed, 75 bytes).
type header4 struct {
	Version      uint32
	Flags        uint32
	Capacity     uint64 // sectors
	Granularity  uint64 // grain size in sectors
	DescOffset   uint64 // sectors
	DescSize     uint64 // sectors
	NumGTEsPerGT uint32
	RGDOffset    uint64 // sectors
	GDOffset     uint64 // sectors
	GrainOffset  uint64 // sectors ("overhead")
	Filler       uint8
	CheckBytes   [4]byte
	CompressAlgo uint16
}

const header4Size = 75

func decodeHeader4(b []byte) header4 {
	le := binary.LittleEndian
	var h header4
	h.Version = le.Uint32(b[0:])
	h.Flags = le.Uint32(b[4:])
	h.Capacity = le.Uint64(b[8:])
	h.Granularity = le.Uint64(b[16:])
	h.DescOffset = le.Uint64(b[24:])
	h.DescSize = le.Uint64(b[32:])
	h.NumGTEsPerGT = le.Uint32(b[40:])
	h.RGDOffset = le.Uint64(b[44:])
	h.GDOffset = le.Uint64(b[52:])
	h.GrainOffset = le.Uint64(b[60:])
	h.Filler = b[68]
	copy(h.CheckBytes[:], b[69:73])
	h.CompressAlgo = le.Uint16(b[73:])
	return h
}

// encode returns the magic and the header, the first 79 bytes of a
// sparse extent.
func (h *header4) encode() []byte {
	le := binary.LittleEndian
	b := make([]byte, 4+header4Size)
	copy(b, magicKDMV)
	p := b[4:]
	le.PutUint32(p[0:], h.Version)
	le.PutUint32(p[4:], h.Flags)
	le.PutUint64(p[8:], h.Capacity)
	le.PutUint64(p[16:], h.Granularity)
	le.PutUint64(p[24:], h.DescOffset)
	le.PutUint64(p[32:], h.DescSize)
	le.PutUint32(p[40:], h.NumGTEsPerGT)
	le.PutUint64(p[44:], h.RGDOffset)
	le.PutUint64(p[52:], h.GDOffset)
	le.PutUint64(p[60:], h.GrainOffset)
	p[68] = h.Filler
	copy(p[69:73], h.CheckBytes[:])
	le.PutUint16(p[73:], h.CompressAlgo)
	return b
}

// checkBytes detect line-ending mangling by file transfers.
var checkBytes = [4]byte{'\n', ' ', '\r', '\n'}

// header3 is the VMDK3 ("COWD", VMFSSPARSE) header after the magic.
type header3 struct {
	Version, Flags, DiskSectors, Granularity uint32
	L1DirOffset, L1DirSize, FileSectors      uint32
	Cylinders, Heads, SectorsPerTrack        uint32
}

const header3Size = 40

func decodeHeader3(b []byte) header3 {
	le := binary.LittleEndian
	return header3{
		Version: le.Uint32(b[0:]), Flags: le.Uint32(b[4:]), DiskSectors: le.Uint32(b[8:]),
		Granularity: le.Uint32(b[12:]), L1DirOffset: le.Uint32(b[16:]), L1DirSize: le.Uint32(b[20:]),
		FileSectors: le.Uint32(b[24:]), Cylinders: le.Uint32(b[28:]), Heads: le.Uint32(b[32:]),
		SectorsPerTrack: le.Uint32(b[36:]),
	}
}

// seConstHeader is the first sector of an ESXi seSparse extent
// (VMDKSESparseConstHeader); only the fields QEMU uses are named.
type seConstHeader struct {
	Magic, Version, Capacity, GrainSize, GrainTableSize, Flags uint64
	Reserved                                                   [4]uint64
	VolatileHeaderOffset, VolatileHeaderSize                   uint64
	JournalHeaderOffset, JournalHeaderSize                     uint64
	JournalOffset, JournalSize                                 uint64
	GrainDirOffset, GrainDirSize                               uint64
	GrainTablesOffset, GrainTablesSize                         uint64
	FreeBitmapOffset, FreeBitmapSize                           uint64
	BackmapOffset, BackmapSize                                 uint64
	GrainsOffset, GrainsSize                                   uint64
	PadIsZero                                                  bool
}

const (
	seConstMagic    = 0xcafebabe
	seVolatileMagic = 0xcafecafe
	seVersion       = 0x0000000200000001
)

func decodeSEConstHeader(b []byte) seConstHeader {
	le := binary.LittleEndian
	u := func(i int) uint64 { return le.Uint64(b[8*i:]) }
	h := seConstHeader{
		Magic: u(0), Version: u(1), Capacity: u(2), GrainSize: u(3), GrainTableSize: u(4), Flags: u(5),
		Reserved:             [4]uint64{u(6), u(7), u(8), u(9)},
		VolatileHeaderOffset: u(10), VolatileHeaderSize: u(11),
		JournalHeaderOffset: u(12), JournalHeaderSize: u(13),
		JournalOffset: u(14), JournalSize: u(15),
		GrainDirOffset: u(16), GrainDirSize: u(17),
		GrainTablesOffset: u(18), GrainTablesSize: u(19),
		FreeBitmapOffset: u(20), FreeBitmapSize: u(21),
		BackmapOffset: u(22), BackmapSize: u(23),
		GrainsOffset: u(24), GrainsSize: u(25),
	}
	h.PadIsZero = formats.IsZero(b[26*8 : sectorSize])
	return h
}

// seVolatileHeader is VMDKSESparseVolatileHeader.
type seVolatileHeader struct {
	Magic, FreeGTNumber, NextTxnSeqNumber, ReplayJournal uint64
	PadIsZero                                            bool
}

func decodeSEVolatileHeader(b []byte) seVolatileHeader {
	le := binary.LittleEndian
	return seVolatileHeader{
		Magic: le.Uint64(b[0:]), FreeGTNumber: le.Uint64(b[8:]),
		NextTxnSeqNumber: le.Uint64(b[16:]), ReplayJournal: le.Uint64(b[24:]),
		PadIsZero: formats.IsZero(b[32:sectorSize]),
	}
}

// marker is a stream-optimized grain or metadata marker: the guest
// sector of a grain and the size of its compressed data, or (with size
// 0) a metadata marker whose type follows.
type marker struct {
	Val  uint64
	Size uint32
	Type uint32
}

func decodeMarker(b []byte) marker {
	le := binary.LittleEndian
	return marker{Val: le.Uint64(b[0:]), Size: le.Uint32(b[8:]), Type: le.Uint32(b[12:])}
}

// grainMarkerSize is the marker in front of a compressed grain: lba and
// size (VmdkGrainMarker).
const grainMarkerSize = 12
