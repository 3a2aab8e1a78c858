package vdi

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// On-disk constants of VirtualBox's VDI format, version 1.1 (QEMU's
// block/vdi.c).
const (
	headerSize = 512
	signature  = 0xbeda107f
	version11  = 0x00010001

	typeDynamic = 1
	typeStatic  = 2

	sectorSize = 512
	blockSize  = 1 << 20 // the only block size QEMU supports

	// unallocatedEntry is a never-allocated block, discardedEntry one
	// that was freed; both read as zeroes.
	unallocatedEntry = 0xffffffff
	discardedEntry   = 0xfffffffe

	// maxBlocksQEMU is VDI_BLOCKS_IN_IMAGE_MAX: the block map must fit in
	// INT_MAX bytes once rounded up to a sector.
	maxBlocksQEMU = (1<<31 - sectorSize) / 4
	maxDiskSize   = maxBlocksQEMU * blockSize

	// headerText is what QEMU writes at the start of images it creates;
	// VirtualBox writes its own "<<< ... >>>" line, the value does not
	// matter.
	headerText = "<<< QEMU VM Virtual Disk Image >>>\n"
)

// maxBlocks bounds the block map imgfs loads: 32M blocks (a 128 MiB map)
// cover 32 TiB. QEMU allows 512 TiB with a 2 GiB map, which a hostile
// header could make imgfs allocate.
const maxBlocks = 32 << 20

// allocated reports whether a block map entry points at a block.
func allocated(e uint32) bool { return e < discardedEntry }

// Header is the 512-byte VDI 1.1 header, little-endian.
type Header struct {
	Text            [64]byte
	Signature       uint32
	Version         uint32
	HeaderSize      uint32
	ImageType       uint32
	ImageFlags      uint32
	Description     [256]byte
	OffsetBmap      uint32
	OffsetData      uint32
	Cylinders       uint32
	Heads           uint32
	Sectors         uint32
	SectorSize      uint32
	Unused1         uint32
	DiskSize        uint64
	BlockSize       uint32
	BlockExtra      uint32
	BlocksInImage   uint32
	BlocksAllocated uint32
	UUIDImage       [16]byte
	UUIDLastSnap    [16]byte
	UUIDLink        [16]byte
	UUIDParent      [16]byte
	Unused2         [56]byte
}

func decodeHeader(buf []byte) *Header {
	le := binary.LittleEndian
	h := &Header{
		Signature:       le.Uint32(buf[0x40:]),
		Version:         le.Uint32(buf[0x44:]),
		HeaderSize:      le.Uint32(buf[0x48:]),
		ImageType:       le.Uint32(buf[0x4c:]),
		ImageFlags:      le.Uint32(buf[0x50:]),
		OffsetBmap:      le.Uint32(buf[0x154:]),
		OffsetData:      le.Uint32(buf[0x158:]),
		Cylinders:       le.Uint32(buf[0x15c:]),
		Heads:           le.Uint32(buf[0x160:]),
		Sectors:         le.Uint32(buf[0x164:]),
		SectorSize:      le.Uint32(buf[0x168:]),
		Unused1:         le.Uint32(buf[0x16c:]),
		DiskSize:        le.Uint64(buf[0x170:]),
		BlockSize:       le.Uint32(buf[0x178:]),
		BlockExtra:      le.Uint32(buf[0x17c:]),
		BlocksInImage:   le.Uint32(buf[0x180:]),
		BlocksAllocated: le.Uint32(buf[0x184:]),
	}
	copy(h.Text[:], buf[0:0x40])
	copy(h.Description[:], buf[0x54:0x154])
	copy(h.UUIDImage[:], buf[0x188:])
	copy(h.UUIDLastSnap[:], buf[0x198:])
	copy(h.UUIDLink[:], buf[0x1a8:])
	copy(h.UUIDParent[:], buf[0x1b8:])
	copy(h.Unused2[:], buf[0x1c8:headerSize])
	return h
}

func (h *Header) encode() []byte {
	le := binary.LittleEndian
	buf := make([]byte, headerSize)
	copy(buf[0:0x40], h.Text[:])
	le.PutUint32(buf[0x40:], h.Signature)
	le.PutUint32(buf[0x44:], h.Version)
	le.PutUint32(buf[0x48:], h.HeaderSize)
	le.PutUint32(buf[0x4c:], h.ImageType)
	le.PutUint32(buf[0x50:], h.ImageFlags)
	copy(buf[0x54:0x154], h.Description[:])
	le.PutUint32(buf[0x154:], h.OffsetBmap)
	le.PutUint32(buf[0x158:], h.OffsetData)
	le.PutUint32(buf[0x15c:], h.Cylinders)
	le.PutUint32(buf[0x160:], h.Heads)
	le.PutUint32(buf[0x164:], h.Sectors)
	le.PutUint32(buf[0x168:], h.SectorSize)
	le.PutUint32(buf[0x16c:], h.Unused1)
	le.PutUint64(buf[0x170:], h.DiskSize)
	le.PutUint32(buf[0x178:], h.BlockSize)
	le.PutUint32(buf[0x17c:], h.BlockExtra)
	le.PutUint32(buf[0x180:], h.BlocksInImage)
	le.PutUint32(buf[0x184:], h.BlocksAllocated)
	copy(buf[0x188:], h.UUIDImage[:])
	copy(buf[0x198:], h.UUIDLastSnap[:])
	copy(buf[0x1a8:], h.UUIDLink[:])
	copy(buf[0x1b8:], h.UUIDParent[:])
	copy(buf[0x1c8:], h.Unused2[:])
	return buf
}

// validate applies vdi_open's checks, in its order and with its
// messages, and imgfs's bound on the block map.
func (h *Header) validate() error {
	unsupported := func(format string, args ...any) error {
		return formats.Errorf(formats.ErrUnsupported, format, args...)
	}
	if h.DiskSize > maxDiskSize {
		return unsupported("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)", h.DiskSize, uint64(maxDiskSize))
	}
	// VBoxManage convertfromraw can write sizes that are not whole
	// sectors; QEMU rounds them up.
	size := (h.DiskSize + sectorSize - 1) &^ (sectorSize - 1)
	switch {
	case h.Signature != signature:
		return formats.Errorf(formats.ErrWrongFormat, "Image not in VDI format (bad signature %08x)", h.Signature)
	case h.Version != version11:
		return unsupported("unsupported VDI image (version %d.%d)", h.Version>>16, h.Version&0xffff)
	case h.OffsetBmap%sectorSize != 0:
		return unsupported("unsupported VDI image (unaligned block map offset 0x%x)", h.OffsetBmap)
	case h.OffsetData%sectorSize != 0:
		return unsupported("unsupported VDI image (unaligned data offset 0x%x)", h.OffsetData)
	case h.SectorSize != sectorSize:
		return unsupported("unsupported VDI image (sector size %d is not %d)", h.SectorSize, sectorSize)
	case h.BlockSize != blockSize:
		return unsupported("unsupported VDI image (block size %d is not %d)", h.BlockSize, blockSize)
	case size > uint64(h.BlocksInImage)*uint64(h.BlockSize):
		return unsupported("unsupported VDI image (disk size %d, image bitmap has room for %d)",
			size, uint64(h.BlocksInImage)*uint64(h.BlockSize))
	case h.UUIDLink != [16]byte{}:
		return unsupported("unsupported VDI image (non-NULL link UUID)")
	case h.UUIDParent != [16]byte{}:
		return unsupported("unsupported VDI image (non-NULL parent UUID)")
	case h.BlocksInImage > maxBlocksQEMU:
		return unsupported("unsupported VDI image (too many blocks %d, max is %d)", h.BlocksInImage, maxBlocksQEMU)
	case h.BlocksInImage > maxBlocks:
		return fmt.Errorf("VDI block map of %d blocks exceeds imgfs's limit of %d: %w", h.BlocksInImage, maxBlocks, formats.ErrUnsupported)
	}
	return nil
}

// bmapBytes is the size of the block map on disk: whole sectors.
func (h *Header) bmapBytes() int64 {
	return (int64(h.BlocksInImage)*4 + sectorSize - 1) &^ (sectorSize - 1)
}
