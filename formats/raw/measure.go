package raw

import "github.com/imgfs/imgfs/formats"

// measure is raw_measure: a raw image needs its whole virtual size,
// allocated or not. Without a source the size is rounded up to a sector.
func measure(o *formats.Options, src formats.Image) (*formats.MeasureResult, error) {
	size := int64(0)
	if src != nil {
		size = src.Size()
	} else {
		n, _ := o.Uint("size")
		// Unsigned like QEMU: sizes near 2^64 wrap.
		size = int64((n + sectorSize - 1) &^ (sectorSize - 1))
	}
	return &formats.MeasureResult{Required: size, FullyAllocated: size}, nil
}
