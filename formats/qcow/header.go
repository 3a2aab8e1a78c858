package qcow

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// On-disk constants of QEMU's qcow version 1 (block/qcow.c).
const (
	magic      = 0x514649fb // "QFI\xfb"
	version    = 1
	headerSize = 48

	cryptNone = 0
	cryptAES  = 1

	// oflagCompressed marks an L2 entry as a compressed cluster: the bits
	// below 63-cluster_bits are the host byte offset, the bits above it
	// the compressed size in bytes.
	oflagCompressed = 1 << 63

	// maxBackingName is QEMU's limit on the stored backing file name.
	maxBackingName = 1023
	// maxL1Entries is QEMU's INT_MAX / sizeof(uint64_t) bound on the L1
	// table; a table is read only when the file also holds it.
	maxL1Entries = (1<<31 - 1) / 8
)

// Header is the 48-byte big-endian qcow header.
type Header struct {
	Magic             uint32
	Version           uint32
	BackingFileOffset uint64
	BackingFileSize   uint32
	MTime             uint32
	Size              uint64
	ClusterBits       uint8
	L2Bits            uint8
	Padding           uint16
	CryptMethod       uint32
	L1TableOffset     uint64
}

// decodeHeader reads a header from the first headerSize bytes of buf.
func decodeHeader(buf []byte) *Header {
	be := binary.BigEndian
	return &Header{
		Magic:             be.Uint32(buf[0:]),
		Version:           be.Uint32(buf[4:]),
		BackingFileOffset: be.Uint64(buf[8:]),
		BackingFileSize:   be.Uint32(buf[16:]),
		MTime:             be.Uint32(buf[20:]),
		Size:              be.Uint64(buf[24:]),
		ClusterBits:       buf[32],
		L2Bits:            buf[33],
		Padding:           be.Uint16(buf[34:]),
		CryptMethod:       be.Uint32(buf[36:]),
		L1TableOffset:     be.Uint64(buf[40:]),
	}
}

// encode returns the header's on-disk bytes.
func (h *Header) encode() []byte {
	buf := make([]byte, headerSize)
	be := binary.BigEndian
	be.PutUint32(buf[0:], h.Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint64(buf[8:], h.BackingFileOffset)
	be.PutUint32(buf[16:], h.BackingFileSize)
	be.PutUint32(buf[20:], h.MTime)
	be.PutUint64(buf[24:], h.Size)
	buf[32] = h.ClusterBits
	buf[33] = h.L2Bits
	be.PutUint16(buf[34:], h.Padding)
	be.PutUint32(buf[36:], h.CryptMethod)
	be.PutUint64(buf[40:], h.L1TableOffset)
	return buf
}

// l1Entries is the number of L1 entries the virtual size needs.
func (h *Header) l1Entries() uint64 {
	shift := uint(h.ClusterBits) + uint(h.L2Bits)
	return (h.Size + 1<<shift - 1) >> shift
}

// validate applies qcow_open's checks, with QEMU's messages, plus the
// bounds imgfs needs before it allocates anything by the header's
// fields. fileSize bounds the L1 table and the backing file name.
func (h *Header) validate(fileSize int64) error {
	if h.Magic != magic {
		return formats.Errorf(formats.ErrWrongFormat, "Image not in qcow format")
	}
	if h.Version != version {
		msg := fmt.Sprintf("qcow (v%d) does not support qcow version %d", version, h.Version)
		if h.Version == 2 || h.Version == 3 {
			msg += "\nTry the 'qcow2' driver instead."
		}
		return formats.Errorf(formats.ErrUnsupported, "%s", msg)
	}
	if h.Size <= 1 {
		return formats.Errorf(formats.ErrCorrupt, "Image size is too small (must be at least 2 bytes)")
	}
	if h.ClusterBits < 9 || h.ClusterBits > 16 {
		return formats.Errorf(formats.ErrCorrupt, "Cluster size must be between 512 and 64k")
	}
	if h.L2Bits < 9-3 || h.L2Bits > 16-3 {
		return formats.Errorf(formats.ErrCorrupt, "L2 table size must be between 512 and 64k")
	}
	if h.CryptMethod > cryptAES {
		return formats.Errorf(formats.ErrCorrupt, "invalid encryption method in qcow header")
	}
	shift := uint(h.ClusterBits) + uint(h.L2Bits)
	if h.Size > ^uint64(0)-1<<shift || h.l1Entries() > maxL1Entries {
		return formats.Errorf(formats.ErrUnsupported, "Image too large")
	}
	if end := h.L1TableOffset + 8*h.l1Entries(); end < h.L1TableOffset || end > uint64(fileSize) {
		return fmt.Errorf("qcow L1 table [%#x, +%d entries) extends past the end of the file (%d bytes): %w",
			h.L1TableOffset, h.l1Entries(), fileSize, formats.ErrCorrupt)
	}
	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > maxBackingName {
			return formats.Errorf(formats.ErrCorrupt, "Backing file name too long")
		}
		if end := h.BackingFileOffset + uint64(h.BackingFileSize); end < h.BackingFileOffset || end > uint64(fileSize) {
			return fmt.Errorf("qcow backing file name [%#x, +%d) extends past the end of the file (%d bytes): %w",
				h.BackingFileOffset, h.BackingFileSize, fileSize, formats.ErrCorrupt)
		}
	}
	return nil
}
