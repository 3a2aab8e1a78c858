package qed

import (
	"context"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// Check is bdrv_qed_co_check: qed_check, repairing in either repair
// mode. QED cannot repair leaks; invalid table entries are cleared.
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	if mode != formats.CheckReadOnly && img.readOnly {
		return nil, fmt.Errorf("%s: cannot repair an image opened read-only: %w", img.f.Name(), formats.ErrReadOnly)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return img.check(mode)
}

// checker is QEDCheck: the result and the clusters referenced so far.
type checker struct {
	img  *Image
	fix  bool
	res  *formats.CheckResult
	used []uint64 // bitmap of referenced clusters, one bit per cluster
}

// markUsed is qed_set_used_clusters: it marks n clusters from host
// offset off, counting a corruption for each already referenced, and
// reports whether none was.
func (c *checker) markUsed(off uint64, n int64) bool {
	first := int64(off >> c.img.clusterBits)
	var dup int64
	for i := first; i < first+n; i++ {
		if c.used[i/64]&(1<<(i%64)) != 0 {
			dup++
		}
		c.used[i/64] |= 1 << (i % 64)
	}
	c.res.Corruptions += dup
	return dup == 0
}

// check is qed_check: walk the tables, count what is allocated and
// fragmented, find entries pointing outside the file (corruptions,
// cleared when fixing) and clusters referenced twice, then count
// clusters nothing references as leaks. When fixing leaves no
// corruption, the need-check bit is cleared. The caller holds mu (or is
// opening the image).
func (img *Image) check(mode formats.CheckMode) (*formats.CheckResult, error) {
	nclusters := img.fileSize >> img.clusterBits
	c := &checker{img: img, fix: mode != formats.CheckReadOnly, res: &formats.CheckResult{},
		used: make([]uint64, (nclusters+63)/64)}
	c.res.TotalClusters = (int64(img.hdr.ImageSize) + img.clusterSize - 1) / img.clusterSize
	c.markUsed(img.hdr.L1TableOffset, int64(img.hdr.TableSize))
	l1Fixed := false
	var lastErr error
	for i, off := range img.l1 {
		if off == 0 {
			continue
		}
		if !img.hdr.validTableOffset(off, img.fileSize) {
			c.invalid(&img.l1[i])
			l1Fixed = l1Fixed || c.fix
			continue
		}
		if !c.markUsed(off, int64(img.hdr.TableSize)) {
			continue
		}
		t, err := img.l2Table(off)
		if err != nil {
			c.res.CheckErrors++
			lastErr = err
			continue
		}
		if c.checkL2(t) && c.fix {
			if err := img.writeEntries(t, off, 0, img.tableEntries); err != nil {
				c.res.CheckErrors++
				lastErr = err
			}
		}
	}
	if l1Fixed {
		if err := img.writeEntries(img.l1, img.hdr.L1TableOffset, 0, img.tableEntries); err != nil {
			c.res.CheckErrors++
			lastErr = err
		}
	}
	if lastErr != nil {
		return nil, lastErr
	}
	for i := int64(img.hdr.HeaderSize); i < nclusters; i++ {
		if c.used[i/64]&(1<<(i%64)) == 0 {
			c.res.Leaks++
		}
	}
	if c.fix && c.res.Corruptions == 0 && c.res.CheckErrors == 0 && img.hdr.Features&featNeedCheck != 0 {
		if err := img.f.Sync(); err != nil {
			return nil, err
		}
		img.hdr.Features &^= featNeedCheck
		if err := img.writeHeader(); err != nil {
			return nil, err
		}
	}
	return c.res, nil
}

// invalid counts an entry pointing outside the file as a corruption,
// or clears it when fixing.
func (c *checker) invalid(e *uint64) {
	if c.fix {
		*e = 0
		c.res.CorruptionsFixed++
	} else {
		c.res.Corruptions++
	}
}

// checkL2 is qed_check_l2_table; it reports whether it changed t.
func (c *checker) checkL2(t []uint64) bool {
	changed := false
	var last uint64
	for i, off := range t {
		if off == 0 || off == zeroCluster {
			continue
		}
		c.res.AllocatedClusters++
		if last != 0 && last+uint64(c.img.clusterSize) != off {
			c.res.FragmentedClusters++
		}
		last = off
		if !c.img.hdr.validClusterOffset(off, c.img.fileSize) {
			c.invalid(&t[i])
			changed = changed || c.fix
			continue
		}
		c.markUsed(off, 1)
	}
	return changed
}
