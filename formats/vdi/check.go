package vdi

import (
	"context"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// Check is vdi_co_check: every allocated block map entry must point
// inside the image and at a block no other entry uses, and the header's
// allocated count must match. Each problem is one corruption, reported
// with QEMU's message. vdi cannot repair, so a repair mode is
// unsupported (qemu-img says the format does not support checks).
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	if mode != formats.CheckReadOnly {
		return nil, fmt.Errorf("vdi cannot repair images: %w", formats.ErrUnsupported)
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	res := &formats.CheckResult{}
	blocks := uint32(len(img.bmap))
	// used[b] is set once some entry points at block b.
	used := make([]bool, blocks)
	var count uint32
	for i, e := range img.bmap {
		if i%(1<<16) == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		if !allocated(e) {
			continue
		}
		if e >= blocks {
			report(fmt.Sprintf("ERROR: block index %d too large, is %d\n", i, e))
			res.Corruptions++
			continue
		}
		count++
		if used[e] {
			// QEMU prints the block number twice here.
			report(fmt.Sprintf("ERROR: block index %d also used by %d\n", e, e))
			res.Corruptions++
			continue
		}
		used[e] = true
	}
	if count != img.hdr.BlocksAllocated {
		report(fmt.Sprintf("ERROR: allocated blocks mismatch, is %d, should be %d\n", count, img.hdr.BlocksAllocated))
		res.Corruptions++
	}
	return res, nil
}
