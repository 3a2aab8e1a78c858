package vdi

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// createOptions are vdi's -o options in QEMU 7.2's table order.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "static", Type: formats.OptBool, Help: "VDI static (pre-allocated) image", Default: "off"},
}

// create is vdi_co_create_opts followed by vdi_co_do_create: the host
// file is created first (so a size QEMU refuses leaves an empty file, as
// there), then the header, the block map and, for a static image, the
// blocks, which are allocated by growing the file.
func create(filename string, o *formats.Options) error {
	f, err := formats.CreateProtocolFile(filename, o)
	if err != nil {
		return err
	}
	err = createOn(f, o)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func createOn(f *formats.File, o *formats.Options) error {
	n, _ := o.Uint("size")
	// QEMU rounds the size up to whole sectors first.
	size := (n + sectorSize - 1) &^ (sectorSize - 1)
	if n > ^uint64(0)-sectorSize || size > maxDiskSize {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported VDI image size (size is 0x%x, max supported is 0x%x)", size, uint64(maxDiskSize))
	}
	static := o.Bool("static")
	blocks := (size + blockSize - 1) / blockSize
	h := &Header{
		Signature:     signature,
		Version:       version11,
		HeaderSize:    0x180,
		ImageType:     typeDynamic,
		OffsetBmap:    headerSize,
		SectorSize:    sectorSize,
		DiskSize:      size,
		BlockSize:     blockSize,
		BlocksInImage: uint32(blocks),
	}
	copy(h.Text[:], headerText)
	bmap := make([]byte, (blocks*4+sectorSize-1)&^(sectorSize-1))
	h.OffsetData = headerSize + uint32(len(bmap))
	for i := range blocks {
		e := uint32(unallocatedEntry)
		if static {
			e = uint32(i)
		}
		binary.LittleEndian.PutUint32(bmap[4*i:], e)
	}
	if static {
		h.ImageType = typeStatic
		h.BlocksAllocated = uint32(blocks)
	}
	newUUID(h.UUIDImage[:])
	newUUID(h.UUIDLastSnap[:])
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return fmt.Errorf("Error writing header: %w", formats.ErrnoError{Err: err})
	}
	if _, err := f.WriteAt(bmap, headerSize); err != nil {
		return fmt.Errorf("Error writing bmap: %w", formats.ErrnoError{Err: err})
	}
	if static {
		if err := f.Truncate(int64(h.OffsetData) + int64(blocks)*blockSize); err != nil {
			return fmt.Errorf("Failed to statically allocate file: %w", formats.ErrnoError{Err: err})
		}
	}
	return nil
}

// newUUID fills u with a random (version 4) UUID in the byte order VDI
// stores it: the first three fields little-endian.
func newUUID(u []byte) {
	rand.Read(u)
	u[7] = u[7]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
}
