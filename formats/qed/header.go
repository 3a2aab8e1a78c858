package qed

import (
	"encoding/binary"
	"math/bits"

	"github.com/imgfs/imgfs/formats"
)

// On-disk constants of QED (docs/interop/qed_spec.txt, block/qed.h).
const (
	magic      = 0x00444551 // "QED\0" little-endian
	headerSize = 64

	// Feature bits.
	featBackingFile = 1 << 0
	// featNeedCheck: the image may have been left inconsistent by a
	// crash during an allocating write and must be checked before use.
	featNeedCheck = 1 << 1
	// featBackingNoProbe: the backing file is raw; do not probe it.
	featBackingNoProbe = 1 << 2
	featureMask        = featBackingFile | featNeedCheck | featBackingNoProbe

	minClusterSize     = 4 << 10
	maxClusterSize     = 64 << 20
	defaultClusterSize = 64 << 10
	minTableSize       = 1
	maxTableSize       = 16
	defaultTableSize   = 4

	// zeroCluster is the L2 entry of a cluster that reads as zeroes.
	zeroCluster = 1

	// maxBackingName bounds the backing file name as QEMU's
	// PATH_MAX-sized buffer does.
	maxBackingName = 4095
)

// Header is the 64-byte little-endian QED header.
type Header struct {
	Magic                 uint32
	ClusterSize           uint32
	TableSize             uint32 // in clusters
	HeaderSize            uint32 // in clusters
	Features              uint64
	CompatFeatures        uint64
	AutoclearFeatures     uint64
	L1TableOffset         uint64
	ImageSize             uint64
	BackingFilenameOffset uint32
	BackingFilenameSize   uint32
}

func decodeHeader(buf []byte) *Header {
	le := binary.LittleEndian
	return &Header{
		Magic:                 le.Uint32(buf[0:]),
		ClusterSize:           le.Uint32(buf[4:]),
		TableSize:             le.Uint32(buf[8:]),
		HeaderSize:            le.Uint32(buf[12:]),
		Features:              le.Uint64(buf[16:]),
		CompatFeatures:        le.Uint64(buf[24:]),
		AutoclearFeatures:     le.Uint64(buf[32:]),
		L1TableOffset:         le.Uint64(buf[40:]),
		ImageSize:             le.Uint64(buf[48:]),
		BackingFilenameOffset: le.Uint32(buf[56:]),
		BackingFilenameSize:   le.Uint32(buf[60:]),
	}
}

func (h *Header) encode() []byte {
	buf := make([]byte, headerSize)
	le := binary.LittleEndian
	le.PutUint32(buf[0:], h.Magic)
	le.PutUint32(buf[4:], h.ClusterSize)
	le.PutUint32(buf[8:], h.TableSize)
	le.PutUint32(buf[12:], h.HeaderSize)
	le.PutUint64(buf[16:], h.Features)
	le.PutUint64(buf[24:], h.CompatFeatures)
	le.PutUint64(buf[32:], h.AutoclearFeatures)
	le.PutUint64(buf[40:], h.L1TableOffset)
	le.PutUint64(buf[48:], h.ImageSize)
	le.PutUint32(buf[56:], h.BackingFilenameOffset)
	le.PutUint32(buf[60:], h.BackingFilenameSize)
	return buf
}

func validClusterSize(n uint64) bool {
	return n >= minClusterSize && n <= maxClusterSize && bits.OnesCount64(n) == 1
}

func validTableSize(n uint64) bool {
	return n >= minTableSize && n <= maxTableSize && bits.OnesCount64(n) == 1
}

// maxImageSize is the size two levels of tables can address.
func maxImageSize(clusterSize, tableSize uint64) uint64 {
	entries := clusterSize * tableSize / 8
	return entries * entries * clusterSize
}

func validImageSize(size, clusterSize, tableSize uint64) bool {
	return size%512 == 0 && size <= maxImageSize(clusterSize, tableSize)
}

// tableBytes is the size of one L1 or L2 table.
func (h *Header) tableBytes() int64 { return int64(h.ClusterSize) * int64(h.TableSize) }

// validate applies bdrv_qed_do_open's checks, with QEMU 7.2's messages
// (the command line adds the file name). fileSize is the file's size
// rounded down to a cluster, which bounds the L1 table.
func (h *Header) validate(fileSize int64) error {
	if h.Magic != magic {
		return formats.Errorf(formats.ErrWrongFormat, "Image not in QED format")
	}
	if f := h.Features &^ featureMask; f != 0 {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported QED features: %x", f)
	}
	if !validClusterSize(uint64(h.ClusterSize)) {
		return formats.Errorf(formats.ErrCorrupt, "QED cluster size is invalid")
	}
	if !validTableSize(uint64(h.TableSize)) {
		return formats.Errorf(formats.ErrCorrupt, "QED table size is invalid")
	}
	if !validImageSize(h.ImageSize, uint64(h.ClusterSize), uint64(h.TableSize)) {
		return formats.Errorf(formats.ErrCorrupt, "QED image size is invalid")
	}
	if !h.validTableOffset(h.L1TableOffset, fileSize) {
		return formats.Errorf(formats.ErrCorrupt, "QED table offset is invalid")
	}
	if uint64(h.HeaderSize) > (1<<32-1)/uint64(h.ClusterSize) {
		return formats.Errorf(formats.ErrCorrupt, "QED header size is too large")
	}
	if h.Features&featBackingFile != 0 {
		end := uint64(h.BackingFilenameOffset) + uint64(h.BackingFilenameSize)
		if end > uint64(h.ClusterSize)*uint64(h.HeaderSize) {
			return formats.Errorf(formats.ErrCorrupt, "QED backing filename offset is invalid")
		}
		if h.BackingFilenameSize > maxBackingName {
			return formats.Errorf(formats.ErrCorrupt, "Failed to read backing filename")
		}
	}
	return nil
}

// validClusterOffset is qed_check_cluster_offset: a cluster-aligned
// offset after the header and before the end of the file.
func (h *Header) validClusterOffset(off uint64, fileSize int64) bool {
	return off&(uint64(h.ClusterSize)-1) == 0 &&
		off >= uint64(h.HeaderSize)*uint64(h.ClusterSize) && off < uint64(fileSize)
}

// validTableOffset is qed_check_table_offset: the table's first and
// last cluster are valid cluster offsets. Like QEMU, whose overflow
// check also catches a last cluster equal to the first, it refuses every
// table of one cluster, so images with table_size=1 (which qemu-img
// creates) cannot be opened.
func (h *Header) validTableOffset(off uint64, fileSize int64) bool {
	last := off + uint64(h.TableSize-1)*uint64(h.ClusterSize)
	return last > off && h.validClusterOffset(off, fileSize) && h.validClusterOffset(last, fileSize)
}
