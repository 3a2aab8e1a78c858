package vpc

import (
	"crypto/rand"
	"fmt"
	"syscall"
	"time"

	"github.com/imgfs/imgfs/formats"
)

// createOptions are vpc's -o options in QEMU 7.2's table order.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "subformat", Type: formats.OptString,
		Help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "},
	{Name: "force_size", Type: formats.OptBool,
		Help: "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation"},
}

// errTooLarge is calculate_rounded_image_size's -EFBIG, which qemu-img
// create reports as "The image size is too large for file format".
var errTooLarge = formats.Errorf(syscall.EFBIG, "Disk size is too large, max size is 2040 GiB")

// create is vpc_co_create_opts followed by vpc_co_create. As in QEMU the
// host file is created before the vpc options are checked, so a bad
// subformat or size leaves an empty file behind.
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
	fixed := false
	switch v := o.String("subformat"); v {
	case "", "dynamic":
	case "fixed":
		fixed = true
	default:
		return formats.Errorf(formats.ErrInvalidOption, "Parameter 'subformat' does not accept value '%s'", v)
	}
	n, _ := o.Uint("size")
	if n > 1<<63-512 {
		return errTooLarge
	}
	// QEMU silently rounds the size up to whole sectors, then (without
	// force_size) to the geometry that describes it.
	size := int64(n+511) &^ 511
	force := o.Bool("force_size")
	sectors, cyls, heads, secs, err := roundedSize(size, force)
	if err != nil {
		return err
	}
	if !force {
		size = sectors * 512
	}
	ft := &Footer{
		Features:    2,
		Version:     0x00010000,
		DataOffset:  footerSize,
		Timestamp:   uint32(time.Now().Unix() - timestampBase),
		Major:       5, // Virtual PC 2007
		Minor:       3,
		OrigSize:    uint64(size),
		CurrentSize: uint64(size),
		Cylinders:   cyls,
		Heads:       heads,
		SecsPerCyl:  secs,
		DiskType:    diskDynamic,
	}
	copy(ft.Cookie[:], footerMagic)
	copy(ft.CreatorApp[:], "qemu")
	if force {
		copy(ft.CreatorApp[:], "qem2")
	}
	copy(ft.CreatorOS[:], "Wi2k")
	if fixed {
		ft.DataOffset = ^uint64(0)
		ft.DiskType = diskFixed
	}
	newUUID(ft.UUID[:])
	ft.Checksum = ft.footerChecksum()
	if fixed {
		return createFixed(f, ft, size)
	}
	return createDynamic(f, ft, sectors)
}

// roundedSize is calculate_rounded_image_size: the sector count and the
// geometry of a new image of size bytes. Without force the geometry is
// the smallest that holds the size; a size beyond what any geometry
// describes gets the largest geometry and keeps its own sector count.
func roundedSize(size int64, force bool) (sectors int64, cyls uint16, heads, secs uint8, err error) {
	if force {
		cyls, heads, secs = 65535, 16, 255
	} else {
		want := min(maxGeometry, size/512)
		for i := int64(0); want > int64(cyls)*int64(heads)*int64(secs); i++ {
			cyls, heads, secs = geometry(want + i)
		}
	}
	sectors = int64(cyls) * int64(heads) * int64(secs)
	if sectors == maxGeometry {
		sectors = size / 512
		if sectors > maxSectors {
			return 0, 0, 0, 0, errTooLarge
		}
	}
	return sectors, cyls, heads, secs, nil
}

// createDynamic writes a dynamic disk as create_dynamic_disk does: the
// footer at 0, the dynamic header at 512, the BAT (all unallocated) at
// 1536 padded to whole sectors, and the footer again behind it.
func createDynamic(f *formats.File, ft *Footer, sectors int64) error {
	entries := (sectors + defaultBlockSize/512 - 1) / (defaultBlockSize / 512)
	batBytes := (entries*4 + 511) &^ 511
	const batOffset = 3 * 512
	dh := &DynHeader{
		DataOffset:      ^uint64(0),
		TableOffset:     batOffset,
		HeaderVersion:   0x00010000,
		MaxTableEntries: uint32(entries),
		BlockSize:       defaultBlockSize,
	}
	copy(dh.Cookie[:], dynHeaderMagic)
	dh.Checksum = checksum(dh.encode(), 36)
	fbuf := ft.encode()
	for _, w := range []struct {
		p   []byte
		off int64
	}{
		{fbuf, 0},
		{fbuf, batOffset + batBytes},
		{ones(batBytes), batOffset},
		{dh.encode(), footerSize},
	} {
		if _, err := f.WriteAt(w.p, w.off); err != nil {
			return fmt.Errorf("Unable to create or write VHD header: %w", formats.ErrnoError{Err: err})
		}
	}
	return nil
}

// createFixed sizes the file to the guest size plus the footer and
// writes the footer at its end.
func createFixed(f *formats.File, ft *Footer, size int64) error {
	if err := f.Truncate(size + footerSize); err != nil {
		return fmt.Errorf("Could not resize file: %w", formats.ErrnoError{Err: err})
	}
	// The file protocol sized the new file to the guest size first, which
	// allocates its first block; the data region keeps it.
	formats.AllocateFirstBlock(f, size)
	if _, err := f.WriteAt(ft.encode(), size); err != nil {
		return fmt.Errorf("Unable to write VHD header: %w", formats.ErrnoError{Err: err})
	}
	return nil
}

// newUUID fills u with a random (version 4) UUID.
func newUUID(u []byte) {
	rand.Read(u)
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
}
