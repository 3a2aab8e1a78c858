package qcow2

import (
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// BlockStatus describes the run of guest bytes at off that shares one
// status in this image alone (qcow2_co_block_status): runs of clusters
// with the same kind and contiguous host offsets merge into one extent.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	return img.blockStatusIn(nil, off, length)
}

// blockStatusIn is BlockStatus through the L1 table l1; nil means the
// active one.
func (img *Image) blockStatusIn(l1 []uint64, off, length int64) (formats.Extent, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if off < 0 || off >= img.size || length <= 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status at %d+%d outside the virtual size %d", img.file.Name(), off, length, img.size)
	}
	length = min(length, img.size-off)
	if img.metaPrealloc == 0 {
		img.metaPrealloc = 1
		if yes, err := img.detectMetadataPreallocation(); err == nil && yes {
			img.metaPrealloc = 2
		}
	}
	var ext formats.Extent
	for pos := off; pos < off+length; {
		m, err := img.lookupIn(l1, pos, off+length-pos)
		if err != nil {
			return formats.Extent{}, err
		}
		e := img.extentOf(m)
		switch {
		case pos == off:
			ext = e
		case e.Status != ext.Status || e.Status&formats.StatusOffsetValid != 0 && e.Offset != ext.Offset+ext.Length:
			return img.withHostHoles(ext), nil
		default:
			ext.Length += e.Length
		}
		pos += e.Length
	}
	return img.withHostHoles(ext), nil
}

// withHostHoles is the BDRV_BLOCK_RECURSE step for images with metadata
// preallocation: QEMU asks the host file about data extents, and where
// the host file has a hole the range reads as zeroes.
func (img *Image) withHostHoles(ext formats.Extent) formats.Extent {
	if img.metaPrealloc != 2 || ext.Status&formats.StatusData == 0 || ext.Status&formats.StatusOffsetValid == 0 {
		return ext
	}
	data, n, err := img.data.DataStatus(ext.Offset, ext.Length)
	if err == nil && n > 0 {
		ext.Length = n
		if !data {
			ext.Status |= formats.StatusZero
		}
	}
	return ext
}

// extentOf converts a lookup result to a block status extent.
func (img *Image) extentOf(m mapping) formats.Extent {
	e := formats.Extent{Length: m.length}
	switch m.typ {
	case Normal:
		e.Status = formats.StatusData | formats.StatusOffsetValid
	case ZeroAlloc:
		e.Status = formats.StatusZero | formats.StatusOffsetValid
	case ZeroPlain:
		e.Status = formats.StatusZero
	case Compressed:
		e.Status = formats.StatusData | formats.StatusCompressed
	case UnallocatedAlloc:
		// QEMU reports the reserved host offset without data.
		e.Status = formats.StatusOffsetValid
	}
	if img.crypt != nil {
		// Encrypted host bytes are no guest data: QEMU maps nothing.
		e.Status &^= formats.StatusOffsetValid
	}
	if e.Status&formats.StatusOffsetValid != 0 {
		e.Offset = int64(m.host)
		e.File = img.data.Name()
	}
	return e
}

// detectMetadataPreallocation is qcow2_detect_metadata_preallocation:
// an image whose refcounts claim clearly more clusters than the host
// file really occupies was preallocated with metadata only.
func (img *Image) detectMetadataPreallocation() (bool, error) {
	size, err := img.file.Size()
	if err != nil {
		return false, err
	}
	real, err := img.file.AllocatedSize()
	if err != nil {
		return false, err
	}
	realClusters := real / img.lay.ClusterSize
	threshold := max(realClusters*10/9, realClusters+2)
	end := (size + img.lay.ClusterSize - 1) / img.lay.ClusterSize
	count := int64(0)
	for c := int64(0); c < end && count < threshold; c++ {
		rc, err := img.Refcount(c)
		if err != nil {
			return false, err
		}
		if rc != 0 {
			count++
		}
	}
	return count >= threshold, nil
}
