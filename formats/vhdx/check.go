package vhdx

import (
	"context"

	"github.com/imgfs/imgfs/formats"
)

// Check is vhdx_co_check: a log replayed when the image was opened
// counts as one repaired corruption, and every fully present block
// outside the file or overlapping the log or a region is a corruption,
// reported as QEMU reports it. There is nothing else to repair: the
// replay already happened on the read-write open that -r implies.
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(msg string)) (*formats.CheckResult, error) {
	res := &formats.CheckResult{}
	if img.logReplayed {
		res.CorruptionsFixed++
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	n, err := img.checkBAT(report, true)
	if err != nil {
		return nil, err
	}
	res.Corruptions = n
	return res, nil
}
