package formats

import "math"

// CreateProtocolFile creates the host file of a new image for a format
// driver whose create, like QEMU's vpc and vdi drivers, first hands the
// file protocol the options the format does not consume: preallocation
// and extent_size_hint are checked as file-posix checks them (the file
// starts empty, so a valid preallocation mode has nothing to fill), then
// the file is created as CreateFile does. nocow is accepted without
// effect.
func CreateProtocolFile(filename string, o *Options) (*File, error) {
	switch v := o.String("preallocation"); v {
	case "", "off", "falloc", "full":
	default:
		return nil, Errorf(ErrInvalidOption, "invalid parameter value: %s", v)
	}
	if hint, ok := o.Uint("extent_size_hint"); ok && hint > math.MaxUint32 {
		return nil, Errorf(ErrInvalidOption, "Extent size hint is too large")
	}
	return CreateFile(filename)
}

// AllocateFirstBlock is file-posix's allocate_first_block: a new file's
// first block (one sector for files under 4 KiB) is written with zeroes,
// so that later alignment probing finds it allocated. qemu-img map shows
// it as data, hence imgfs does it too. It is an optimisation in QEMU, so
// failure is ignored.
func AllocateFirstBlock(f *File, size int64) {
	n := int64(4096)
	if size < n {
		n = 512
	}
	f.WriteAt(make([]byte, n), 0)
}
