package parallels

import (
	"fmt"
	"math"

	"github.com/imgfs/imgfs/formats"
)

// createOptions are parallels' -o options in QEMU 7.2's table order.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "cluster_size", Type: formats.OptSize, Help: "Parallels image cluster size", Default: "1048576"},
}

// create is parallels_co_create_opts and parallels_co_create: size and
// cluster size are rounded up to whole sectors, checked, and a new-style
// ("WithouFreSpacExt") header is written with an empty catalog that
// fills whole clusters.
func create(filename string, o *formats.Options) error {
	size, _ := o.Uint("size")
	cl, ok := o.Uint("cluster_size")
	if !ok {
		cl = defaultClust
	}
	if size > math.MaxInt64-sectorSize || cl > math.MaxInt64-sectorSize {
		return formats.Errorf(formats.ErrInvalidOption, "Image size is too large for this cluster size")
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	cl = (cl + sectorSize - 1) &^ (sectorSize - 1)
	f, err := formats.CreateProtocolFile(filename, o)
	if err != nil {
		return err
	}
	err = createOn(f, size, cl)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func createOn(f *formats.File, size, cl uint64) error {
	if cl >= math.MaxInt64/maxImageFactor {
		return formats.Errorf(formats.ErrInvalidOption, "Cluster size is too large")
	}
	if size >= maxImageFactor*cl {
		return formats.Errorf(formats.ErrInvalidOption, "Image size is too large for this cluster size")
	}
	entries := (size + cl - 1) / cl
	// The header and catalog take whole clusters; data starts after them.
	catBytes := (entries*4 + headerSize + cl - 1) / cl * cl
	h := &header{
		Version:    version,
		Heads:      16,
		Cylinders:  uint32(size / sectorSize / 16 / 32),
		Tracks:     uint32(cl / sectorSize),
		BATEntries: uint32(entries),
		NbSectors:  size / sectorSize,
		DataOff:    uint32(catBytes / sectorSize),
	}
	copy(h.Magic[:], magicExt)
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return fmt.Errorf("Could not write parallels header: %w", formats.ErrnoError{Err: err})
	}
	// The catalog reads as zeroes: extend the file over it.
	if err := f.Truncate(int64(catBytes)); err != nil {
		return fmt.Errorf("Could not write parallels header: %w", formats.ErrnoError{Err: err})
	}
	return nil
}
