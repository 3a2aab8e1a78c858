package vhdx

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
)

// On-disk layout (MS-VHDX 1.0, section 2). Everything is little-endian.
const (
	kiB = 1 << 10
	miB = 1 << 20

	// The header section: file identifier, two headers, two region
	// tables, each in its own 64 KiB block, in the first MiB.
	headerBlockSize   = 64 * kiB
	header1Offset     = 1 * headerBlockSize
	header2Offset     = 2 * headerBlockSize
	regionTable1      = 3 * headerBlockSize
	regionTable2      = 4 * headerBlockSize
	headerSectionEnd  = 1 * miB
	headerCRCSize     = 4 * kiB // a header's checksum covers its first 4 KiB
	headerLen         = 80
	regionEntryLen    = 32
	maxRegionEntries  = 2047
	metadataTableSize = 64 * kiB // header and up to 2047 entries
	metadataEntryLen  = 32

	blockSizeMin = 1 * miB
	blockSizeMax = 256 * miB
	// maxSectorsPerBlock is the spec's 2^23 sectors one sector bitmap
	// block describes; it fixes the chunk ratio.
	maxSectorsPerBlock = 1 << 23
	// maxImageSize is QEMU's VHDX_MAX_IMAGE_SIZE (64 TiB).
	maxImageSize = 64 << 40

	// BAT entries: state in the low 3 bits, file offset in MiB units in
	// the top 44 bits.
	batStateMask  = 7
	batOffsetMask = 0xFFFFFFFFFFF00000
)

// Payload block states (BAT entry low bits).
const (
	blockNotPresent       = 0
	blockUndefined        = 1
	blockZero             = 2
	blockUnmapped         = 3
	blockUnmappedV095     = 5 // the state's value in draft 0.95 of the spec
	blockFullyPresent     = 6
	blockPartiallyPresent = 7
)

// Signatures.
var (
	fileSignature     = []byte("vhdxfile")
	headerSignature   = []byte("head")
	regionSignature   = []byte("regi")
	metadataSignature = []byte("metadata")
)

// guid is an MS GUID as stored: data1 (LE u32), data2, data3 (LE u16),
// data4 (8 bytes).
type guid [16]byte

func makeGUID(d1 uint32, d2, d3 uint16, d4 [8]byte) guid {
	var g guid
	binary.LittleEndian.PutUint32(g[0:], d1)
	binary.LittleEndian.PutUint16(g[4:], d2)
	binary.LittleEndian.PutUint16(g[6:], d3)
	copy(g[8:], d4[:])
	return g
}

// Region table and metadata item GUIDs (MS-VHDX 2.2.2 and 2.6.2).
var (
	batGUID           = makeGUID(0x2dc27766, 0xf623, 0x4200, [8]byte{0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08})
	metadataGUID      = makeGUID(0x8b7ca206, 0x4790, 0x4b9a, [8]byte{0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e})
	fileParamGUID     = makeGUID(0xcaa16737, 0xfa36, 0x4d43, [8]byte{0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b})
	virtualSizeGUID   = makeGUID(0x2fa54224, 0xcd1b, 0x4876, [8]byte{0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8})
	page83GUID        = makeGUID(0xbeca12ab, 0xb2e6, 0x4523, [8]byte{0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46})
	physSectorGUID    = makeGUID(0xcda348c7, 0x445d, 0x4471, [8]byte{0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56})
	parentLocatorGUID = makeGUID(0xa8d35f2d, 0xb30b, 0x454d, [8]byte{0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c})
	logicalSectorGUID = makeGUID(0x8141bf1d, 0xa96f, 0x4709, [8]byte{0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f})
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC-32C of buf with the 4-byte checksum field at
// crcOff taken as zero, as every VHDX structure is summed.
func checksum(buf []byte, crcOff int) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, buf[:crcOff])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, buf[crcOff+4:])
}

// checksumValid reports whether the checksum stored at crcOff matches.
func checksumValid(buf []byte, crcOff int) bool {
	return binary.LittleEndian.Uint32(buf[crcOff:]) == checksum(buf, crcOff)
}

// setChecksum stores buf's checksum at crcOff.
func setChecksum(buf []byte, crcOff int) {
	binary.LittleEndian.PutUint32(buf[crcOff:], checksum(buf, crcOff))
}

// header is one of the two image headers (MS-VHDX 2.2.2).
type header struct {
	Signature     [4]byte
	Checksum      uint32
	Sequence      uint64
	FileWriteGUID guid
	DataWriteGUID guid
	LogGUID       guid
	LogVersion    uint16
	Version       uint16
	LogLength     uint32
	LogOffset     uint64
}

func decodeHeader(b []byte) header {
	le := binary.LittleEndian
	var h header
	copy(h.Signature[:], b[0:4])
	h.Checksum = le.Uint32(b[4:])
	h.Sequence = le.Uint64(b[8:])
	copy(h.FileWriteGUID[:], b[16:32])
	copy(h.DataWriteGUID[:], b[32:48])
	copy(h.LogGUID[:], b[48:64])
	h.LogVersion = le.Uint16(b[64:])
	h.Version = le.Uint16(b[66:])
	h.LogLength = le.Uint32(b[68:])
	h.LogOffset = le.Uint64(b[72:])
	return h
}

// encode writes the header fields over the start of b (the 4 KiB
// checksummed area, whose other bytes are kept) and sets the checksum.
func (h *header) encode(b []byte) {
	le := binary.LittleEndian
	copy(b[0:4], headerSignature)
	le.PutUint64(b[8:], h.Sequence)
	copy(b[16:32], h.FileWriteGUID[:])
	copy(b[32:48], h.DataWriteGUID[:])
	copy(b[48:64], h.LogGUID[:])
	le.PutUint16(b[64:], h.LogVersion)
	le.PutUint16(b[66:], h.Version)
	le.PutUint32(b[68:], h.LogLength)
	le.PutUint64(b[72:], h.LogOffset)
	setChecksum(b[:headerCRCSize], 4)
	h.Checksum = le.Uint32(b[4:])
	h.Signature = [4]byte(headerSignature)
}

// headerValid reports what vhdx_parse_header accepts: a good checksum over
// the 4 KiB, the signature and version 1.
func headerValid(b []byte) bool {
	return checksumValid(b[:headerCRCSize], 4) && bytes.Equal(b[0:4], headerSignature) &&
		binary.LittleEndian.Uint16(b[66:]) == 1
}

// regionEntry is one region table entry (MS-VHDX 2.2.3.2).
type regionEntry struct {
	GUID       guid
	FileOffset uint64
	Length     uint32
	Required   bool
}

func decodeRegionEntry(b []byte) regionEntry {
	le := binary.LittleEndian
	var e regionEntry
	copy(e.GUID[:], b[0:16])
	e.FileOffset = le.Uint64(b[16:])
	e.Length = le.Uint32(b[24:])
	e.Required = le.Uint32(b[28:])&1 != 0
	return e
}

func (e *regionEntry) encode(b []byte) {
	le := binary.LittleEndian
	copy(b[0:16], e.GUID[:])
	le.PutUint64(b[16:], e.FileOffset)
	le.PutUint32(b[24:], e.Length)
	var bits uint32
	if e.Required {
		bits = 1
	}
	le.PutUint32(b[28:], bits)
}

// metadataEntry is one metadata table entry (MS-VHDX 2.6.1.2).
type metadataEntry struct {
	ItemID guid
	Offset uint32 // from the start of the metadata region
	Length uint32
	Flags  uint32 // bit 0 user, bit 1 virtual disk, bit 2 required
}

const (
	metaIsVirtualDisk = 2
	metaIsRequired    = 4
)

func decodeMetadataEntry(b []byte) metadataEntry {
	le := binary.LittleEndian
	var e metadataEntry
	copy(e.ItemID[:], b[0:16])
	e.Offset = le.Uint32(b[16:])
	e.Length = le.Uint32(b[20:])
	e.Flags = le.Uint32(b[24:])
	return e
}

func (e *metadataEntry) encode(b []byte) {
	le := binary.LittleEndian
	copy(b[0:16], e.ItemID[:])
	le.PutUint32(b[16:], e.Offset)
	le.PutUint32(b[20:], e.Length)
	le.PutUint32(b[24:], e.Flags)
}

// File parameter flags (MS-VHDX 2.6.2.1).
const (
	paramLeaveBlocksAllocated = 1
	paramHasParent            = 2
)
