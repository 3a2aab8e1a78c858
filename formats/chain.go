package formats

import (
	"errors"
	"io"
)

// ChainExtent is a run of guest bytes as the whole backing chain sees it,
// the unit of `qemu-img map`.
type ChainExtent struct {
	Extent
	// Depth is how many backing levels below the top the status was
	// found (the chain length when no image allocates the range).
	Depth int
	// Present: some image in the chain allocates the range.
	Present bool
}

// ChainStatus walks img's backing chain from the top, as qemu-img map's
// get_block_status does: the first layer that allocates the range decides
// it; below the bottom layer, and past the end of a shorter backing image,
// the range reads as zeroes.
func ChainStatus(img Image, off, length int64) (ChainExtent, error) {
	depth := 0
	for {
		e, err := img.BlockStatus(off, length)
		if err != nil {
			return ChainExtent{}, err
		}
		if e.Status.Allocated() {
			return ChainExtent{Extent: e, Depth: depth, Present: true}, nil
		}
		var backing Image
		if b, ok := img.(Backed); ok {
			backing = b.Backing()
		}
		if backing == nil || off >= backing.Size() {
			e.Status |= StatusZero
			return ChainExtent{Extent: e, Depth: depth}, nil
		}
		img, length = backing, min(e.Length, backing.Size()-off)
		depth++
	}
}

// ReadBacking reads guest bytes at off from a backing image (a parent)
// into p: what lies past its end, or everything when backing is nil,
// reads as zeroes, as QEMU reads an overlay's unallocated clusters.
func ReadBacking(backing Image, p []byte, off int64) error {
	k := int64(0)
	if backing != nil && off < backing.Size() {
		k = min(int64(len(p)), backing.Size()-off)
		if n, err := backing.ReadAt(p[:k], off); err != nil && !(errors.Is(err, io.EOF) && int64(n) == k) {
			return err
		}
	}
	clear(p[k:])
	return nil
}
