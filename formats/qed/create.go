package qed

import (
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// createOptions are qed's -o options in QEMU 7.2's table order.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "backing_file", Type: formats.OptString, Help: "File name of a base image"},
	{Name: "backing_fmt", Type: formats.OptString, Help: "Image format of the base image"},
	{Name: "cluster_size", Type: formats.OptSize, Help: "Cluster size (in bytes)", Default: "65536"},
	{Name: "table_size", Type: formats.OptSize, Help: "L1/L2 table size (in clusters)"},
}

// create is bdrv_qed_co_create_opts and bdrv_qed_co_create: the size is
// rounded up to a sector and validated with the cluster and table sizes,
// then the header, the backing file name after it and a zeroed L1 table
// in the cluster after the header are written. A raw backing format is
// recorded as a feature bit; other formats are not stored.
func create(filename string, o *formats.Options) error {
	cs, _ := o.Uint("cluster_size")
	ts := uint64(defaultTableSize)
	if v, ok := o.Uint("table_size"); ok {
		ts = v
	}
	size, _ := o.Uint("size")
	backing, backingFmt := o.String("backing_file"), o.String("backing_fmt")
	if backingFmt != "" && formats.Lookup(backingFmt) == nil {
		return formats.Errorf(formats.ErrInvalidOption, "Parameter 'backing-fmt' does not accept value '%s'", backingFmt)
	}
	f, err := formats.CreateProtocolFile(filename, o)
	if err != nil {
		return err
	}
	err = createOn(f, size, cs, ts, backing, backingFmt)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func createOn(f *formats.File, size, cs, ts uint64, backing, backingFmt string) error {
	if size > ^uint64(0)-511 {
		size = 0 // QEMU's ROUND_UP wraps to 0 here
	}
	size = (size + 511) &^ 511
	if !validClusterSize(cs) {
		return formats.Errorf(formats.ErrInvalidOption, "QED cluster size must be within range [%d, %d] and power of 2",
			minClusterSize, maxClusterSize)
	}
	if !validTableSize(ts) {
		return formats.Errorf(formats.ErrInvalidOption, "QED table size must be within range [%d, %d] and power of 2",
			minTableSize, maxTableSize)
	}
	if !validImageSize(size, cs, ts) {
		return formats.Errorf(formats.ErrInvalidOption, "QED image size must be a non-zero multiple of cluster size and less than %d bytes",
			maxImageSize(cs, ts))
	}
	h := &Header{Magic: magic, ClusterSize: uint32(cs), TableSize: uint32(ts), HeaderSize: 1,
		L1TableOffset: cs, ImageSize: size}
	if backing != "" {
		if headerSize+len(backing) > int(cs) {
			return fmt.Errorf("backing file name of %d bytes does not fit a %d-byte QED header cluster: %w",
				len(backing), cs, formats.ErrInvalidOption)
		}
		h.Features |= featBackingFile
		h.BackingFilenameOffset = headerSize
		h.BackingFilenameSize = uint32(len(backing))
		if backingFmt == "raw" {
			h.Features |= featBackingNoProbe
		}
	}
	if _, err := f.WriteAt(append(h.encode(), backing...), 0); err != nil {
		return formats.ErrnoError{Err: err}
	}
	// The L1 table is written as zeroes, so that the file's allocation
	// (info's disk size) is QEMU's too.
	n := int64(cs * ts)
	zero := make([]byte, min(n, 1<<20))
	for off := int64(0); off < n; off += int64(len(zero)) {
		if _, err := f.WriteAt(zero[:min(int64(len(zero)), n-off)], int64(cs)+off); err != nil {
			return formats.ErrnoError{Err: err}
		}
	}
	return nil
}
