package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/imgfs/imgfs/formats"
)

// Everything in this file runs with img.mu held.

// corruptf reports corrupt metadata found while reading or writing,
// naming the image file; it does not mark the image corrupt.
func (img *Image) corruptf(format string, args ...any) error {
	return fmt.Errorf("%s: %s: %w", img.file.Name(), fmt.Sprintf(format, args...), formats.ErrCorrupt)
}

// readCluster reads one cluster of metadata at host offset off.
func (img *Image) readCluster(off uint64) ([]byte, error) {
	buf := make([]byte, img.lay.ClusterSize)
	return buf, img.readClusterInto(buf, off)
}

// readClusterInto reads the cluster-sized metadata at off into buf.
func (img *Image) readClusterInto(buf []byte, off uint64) error {
	if off >= maxHostOffset {
		return img.corruptf("metadata offset %#x beyond the 56-bit limit", off)
	}
	if _, err := img.file.ReadAt(buf, int64(off)); err != nil {
		return fmt.Errorf("%s: reading metadata at %#x: %w", img.file.Name(), off, err)
	}
	return nil
}

// refblockAt returns refcount block i of the refcount table, loading it
// into the cache, or nil when the table has no block there.
func (img *Image) refblockAt(i int64) (*cachedTable, error) {
	if i >= int64(len(img.reftable)) {
		return nil, nil
	}
	off := img.reftable[i] & OffsetMask
	if off == 0 {
		return nil, nil
	}
	if img.reftable[i]&uint64(img.lay.ClusterSize-1) != 0 {
		return nil, img.corruptf("Refblock offset %#x unaligned (reftable index: %#x)", img.reftable[i], i)
	}
	return img.refblockFor(off)
}

// Refcount returns the reference count of host cluster c (a cluster
// index, not a byte offset). Clusters no refcount block covers have 0.
func (img *Image) Refcount(c int64) (uint64, error) {
	b, err := img.refblockAt(c >> img.lay.RefblockBits)
	if b == nil || err != nil {
		return 0, err
	}
	return GetRefcount(b.data, c&(img.lay.RefblockEntries-1), img.lay.RefcountOrder), nil
}

// updateRefcounts adds delta to the refcounts of clusters [c, c+n). The
// refcount blocks must exist (allocClusters makes sure of that for
// increments; decremented clusters had a refcount). Freed clusters drop
// out of the metadata caches and lower the free-space hint.
func (img *Image) updateRefcounts(c, n int64, delta int64) error {
	if delta < 0 {
		if err := img.refcountsDependOnL2(); err != nil {
			return err
		}
	}
	order := img.lay.RefcountOrder
	maxRef := MaxRefcount(order)
	for i := c; i < c+n; i++ {
		b, err := img.refblockAt(i >> img.lay.RefblockBits)
		if err != nil {
			return err
		}
		if b == nil {
			return img.corruptf("no refcount block for cluster %#x", i<<img.lay.ClusterBits)
		}
		idx := i & (img.lay.RefblockEntries - 1)
		old := GetRefcount(b.data, idx, order)
		switch {
		case delta < 0 && old < uint64(-delta):
			return img.corruptf("refcount of cluster %#x would drop below zero", i<<img.lay.ClusterBits)
		case delta > 0 && old > maxRef-uint64(delta):
			return fmt.Errorf("%s: refcount of cluster %#x would exceed the %d-bit maximum: %w",
				img.file.Name(), i<<img.lay.ClusterBits, img.lay.RefcountBits, formats.ErrUnsupported)
		}
		v := uint64(int64(old) + delta)
		SetRefcount(b.data, idx, order, v)
		b.dirty = true
		if v == 0 {
			img.freeHint = min(img.freeHint, i)
			if img.freeBytePos>>img.lay.ClusterBits == i {
				// Compressed data must not continue in a freed cluster
				// that may be handed out for something else.
				img.freeBytePos = 0
			}
			off := uint64(i) << img.lay.ClusterBits
			img.l2Cache.drop(off)
			img.rbCache.drop(off)
		}
	}
	return nil
}

// findFree returns the first run of n clusters with refcount 0 at or
// after cluster from.
func (img *Image) findFree(from, n int64) (int64, error) {
	start, run := from, int64(0)
	limit := int64(maxHostOffset) >> img.lay.ClusterBits
	for c := from; run < n; c++ {
		if c >= limit {
			return 0, fmt.Errorf("%s: no free host cluster below 2^56: %w", img.file.Name(), formats.ErrUnsupported)
		}
		rc, err := img.Refcount(c)
		if err != nil {
			return 0, err
		}
		if rc != 0 {
			start, run = c+1, 0
			continue
		}
		run++
	}
	return start, nil
}

// allocClusters allocates n contiguous host clusters (refcount 1) and
// returns the byte offset of the first. The refcounts are only cached;
// callers that reference the clusters from an L2 table call
// l2DependsOnRefcounts first. Like QEMU's qcow2_alloc_clusters, it finds
// a free run, and when a refcount block for it is missing, creates that
// block after the run and searches again from the same place.
func (img *Image) allocClusters(n int64) (uint64, error) {
	if err := img.beforeMetadataWrite(); err != nil {
		return 0, err
	}
	for {
		start, err := img.findFree(img.freeHint, n)
		if err != nil {
			return 0, err
		}
		img.freeHint = start + n
		created := false
		for rt := start >> img.lay.RefblockBits; rt <= (start+n-1)>>img.lay.RefblockBits && !created; rt++ {
			b, err := img.refblockAt(rt)
			if err != nil {
				return 0, err
			}
			if b == nil {
				if err := img.allocRefblock(rt); err != nil {
					return 0, err
				}
				created = true
			}
		}
		if created {
			// The new refcount blocks may sit in the run just found.
			img.freeHint = min(img.freeHint, start)
			continue
		}
		off := uint64(start) << img.lay.ClusterBits
		if err := img.checkOverlap(off, uint64(n)<<img.lay.ClusterBits); err != nil {
			return 0, err
		}
		if err := img.updateRefcounts(start, n, 1); err != nil {
			return 0, err
		}
		return off, nil
	}
}

// allocRefblock creates refcount block rt in the first free cluster, as
// QEMU's alloc_refcount_block: a block that falls into its own range
// describes itself, otherwise its refcount goes into the block covering
// it (created first when missing). The block and its own refcount reach
// the disk before the refcount table entry that points to it. When rt
// lies beyond the refcount table, the table is moved to a bigger one
// placed in the refcount range after the blocks in use, as QEMU does;
// the caller searches again either way.
func (img *Image) allocRefblock(rt int64) error {
	lay := &img.lay
	c, err := img.findFree(img.freeHint, 1)
	if err != nil {
		return err
	}
	img.freeHint = c + 1
	off := uint64(c) << lay.ClusterBits
	if err := img.checkOverlap(off, uint64(lay.ClusterSize)); err != nil {
		return err
	}
	block := make([]byte, lay.ClusterSize)
	if c>>lay.RefblockBits == rt {
		SetRefcount(block, c&(lay.RefblockEntries-1), lay.RefcountOrder, 1)
	} else {
		for {
			b, err := img.refblockAt(c >> lay.RefblockBits)
			if err != nil {
				return err
			}
			if b != nil {
				break
			}
			if err := img.allocRefblock(c >> lay.RefblockBits); err != nil {
				return err
			}
		}
		if err := img.updateRefcounts(c, 1, 1); err != nil {
			return err
		}
		if err := img.flushRefcounts(); err != nil {
			return err
		}
		if rt < int64(len(img.reftable)) && img.reftable[rt] != 0 {
			// A nested allocation grew the table and created block rt
			// on the way; give back the cluster taken for it.
			return img.updateRefcounts(c, 1, -1)
		}
	}
	if err := img.writeSync(block, off); err != nil {
		return err
	}
	if _, err := img.rbCache.add(off, block, false); err != nil {
		return err
	}
	if rt < int64(len(img.reftable)) {
		var e [8]byte
		binary.BigEndian.PutUint64(e[:], off)
		if err := img.writeSync(e[:], img.hdr.RefcountTableOffset+uint64(rt)*8); err != nil {
			return err
		}
		img.reftable[rt] = off
		img.tablesChanged()
		return nil
	}
	blocksUsed := max(rt, c>>lay.RefblockBits) + 1
	_, err = img.refcountArea(blocksUsed<<lay.RefblockBits, 0, false, rt, off)
	return err
}

// refcountMetadata is qcow2_refcount_metadata_size: the number of
// refcount blocks and table clusters needed to count clusters host
// clusters and themselves. generous adds room for the table to grow by
// half.
func (l *Layout) refcountMetadata(clusters int64, generous bool) (blocks, table int64) {
	perTable := l.ClusterSize / 8
	var n, last int64
	for {
		last = n
		blocks = (clusters + table + blocks + l.RefblockEntries - 1) / l.RefblockEntries
		table = (blocks + perTable - 1) / perTable
		n = clusters + blocks + table
		if n == last && generous {
			clusters += (table + 1) / 2
			n = 0
			generous = false
		}
		if n == last {
			return blocks, table
		}
	}
}

// refcountArea is qcow2_refcount_area: starting at cluster start, where
// only free space follows, it writes new refcount blocks and a new,
// larger refcount table that cover themselves and additional more
// clusters after them, switches the header to the new table and frees
// the old one. Unless exact, the table gets 50% spare entries. A
// non-zero newOff is entered as block newIdx. It returns the cluster
// index just past the new structures.
func (img *Image) refcountArea(start, additional int64, exact bool, newIdx int64, newOff uint64) (int64, error) {
	lay := &img.lay
	total, _ := lay.refcountMetadata(start+additional, !exact)
	perCluster := lay.ClusterSize / 8
	tableSize := total
	if !exact {
		tableSize += (total + 1) / 2
	}
	tableSize = (tableSize + perCluster - 1) / perCluster * perCluster
	if total*8 > maxRefcountTableBytes || tableSize*8 > maxRefcountTableBytes {
		return 0, fmt.Errorf("%s: refcount table would exceed %d bytes: %w", img.file.Name(), maxRefcountTableBytes, formats.ErrUnsupported)
	}
	tableClusters := tableSize / perCluster
	table := make([]uint64, tableSize)
	copy(table, img.reftable)
	if newOff != 0 {
		table[newIdx] = newOff
	}
	areaIdx := start >> lay.RefblockBits
	var newBlocks int64
	for i := areaIdx; i < total; i++ {
		if table[i] == 0 {
			newBlocks++
		}
	}
	tableStart := start + newBlocks
	end := tableStart + tableClusters
	if err := img.checkOverlap(uint64(start)<<lay.ClusterBits, uint64(end-start)<<lay.ClusterBits); err != nil {
		return 0, err
	}
	next := start
	for i := areaIdx; i < total; i++ {
		var b *cachedTable
		if table[i] != 0 {
			var err error
			if b, err = img.refblockFor(table[i]); err != nil {
				return 0, err
			}
		} else {
			var err error
			table[i] = uint64(next) << lay.ClusterBits
			if b, err = img.rbCache.add(table[i], make([]byte, lay.ClusterSize), true); err != nil {
				return 0, err
			}
			next++
		}
		first := i << lay.RefblockBits
		for c := max(first, start); c < min(end, first+lay.RefblockEntries); c++ {
			SetRefcount(b.data, c-first, lay.RefcountOrder, 1)
			b.dirty = true
		}
	}
	if err := img.flushRefcounts(); err != nil {
		return 0, err
	}
	buf := make([]byte, tableSize*8)
	for i, e := range table {
		binary.BigEndian.PutUint64(buf[8*i:], e)
	}
	tableOff := uint64(tableStart) << lay.ClusterBits
	if err := img.writeSync(buf, tableOff); err != nil {
		return 0, err
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[0:], tableOff)
	binary.BigEndian.PutUint32(hdr[8:], uint32(tableClusters))
	if err := img.writeSync(hdr[:], 48); err != nil {
		return 0, err
	}
	oldOff, oldClusters := img.hdr.RefcountTableOffset, int64(img.hdr.RefcountTableClusters)
	img.hdr.RefcountTableOffset, img.hdr.RefcountTableClusters = tableOff, uint32(tableClusters)
	img.reftable = table
	img.tablesChanged()
	if err := img.updateRefcounts(int64(oldOff>>lay.ClusterBits), oldClusters, -1); err != nil {
		return 0, err
	}
	return end, nil
}

// refblockFor returns the cached refcount block at host offset off.
func (img *Image) refblockFor(off uint64) (*cachedTable, error) {
	if t := img.rbCache.get(off); t != nil {
		return t, nil
	}
	buf, err := img.readCluster(off)
	if err != nil {
		return nil, err
	}
	return img.rbCache.add(off, buf, false)
}

// writeSync writes metadata and makes it durable before anything that
// points to it is written.
func (img *Image) writeSync(buf []byte, off uint64) error {
	if _, err := img.file.WriteAt(buf, int64(off)); err != nil {
		return err
	}
	return img.file.Sync()
}

// l2DependsOnRefcounts records that cached L2 tables are about to
// reference newly allocated clusters: refcount blocks must then be
// written first. With lazy refcounts the dirty bit covers this instead.
// A pending dependency the other way round is resolved first so that
// the two never form a cycle.
func (img *Image) l2DependsOnRefcounts() error {
	if img.lazyRefcounts() {
		return nil
	}
	if img.refcountsNeedL2 {
		if err := img.flushL2(); err != nil {
			return err
		}
	}
	img.l2NeedsRefcounts = true
	return nil
}

// refcountsDependOnL2 records that refcount decrements are about to be
// cached for clusters whose L2 entries were dropped: L2 tables must be
// written first.
func (img *Image) refcountsDependOnL2() error {
	if img.l2NeedsRefcounts {
		if err := img.flushRefcounts(); err != nil {
			return err
		}
	}
	img.refcountsNeedL2 = true
	return nil
}

// flushRefcounts writes every dirty refcount block and syncs.
func (img *Image) flushRefcounts() error {
	if img.rbCache.hasDirty() {
		if err := img.rbCache.flush(); err != nil {
			return err
		}
		if err := img.file.Sync(); err != nil {
			return err
		}
	}
	img.l2NeedsRefcounts = false
	return nil
}

// flushL2 writes every dirty L2 table and syncs.
func (img *Image) flushL2() error {
	if img.l2Cache.hasDirty() {
		if err := img.l2Cache.flush(); err != nil {
			return err
		}
		if err := img.file.Sync(); err != nil {
			return err
		}
	}
	img.refcountsNeedL2 = false
	return nil
}

// flushCaches writes all cached metadata, each cache after the one it
// depends on.
func (img *Image) flushCaches() error {
	if img.refcountsNeedL2 {
		if err := img.flushL2(); err != nil {
			return err
		}
	}
	if err := img.flushRefcounts(); err != nil {
		return err
	}
	return img.flushL2()
}

// writeL2 is the L2 cache's write-back.
func (img *Image) writeL2(t *cachedTable) error {
	if img.l2NeedsRefcounts {
		if err := img.flushRefcounts(); err != nil {
			return err
		}
	}
	if err := img.storeTable(t); err != nil {
		return err
	}
	t.dirty = false
	return nil
}

// writeRefblock is the refcount block cache's write-back.
func (img *Image) writeRefblock(t *cachedTable) error {
	if img.refcountsNeedL2 {
		if err := img.flushL2(); err != nil {
			return err
		}
	}
	if _, err := img.file.WriteAt(t.data, int64(t.offset)); err != nil {
		return err
	}
	t.dirty = false
	return nil
}

// lazyRefcounts: refcount updates may lag behind, covered by the dirty
// bit. The header's compatible bit says so unless the lazy-refcounts
// runtime option overrides it.
func (img *Image) lazyRefcounts() bool {
	if img.runtime.lazySet {
		return img.runtime.lazyRefcounts
	}
	return img.hdr.CompatibleFeatures&CompatLazyRefcounts != 0
}

// beforeMetadataWrite runs before the first metadata change: it refuses
// read-only and corrupt images and, with lazy refcounts, sets the dirty
// bit on disk (qcow2_mark_dirty).
func (img *Image) beforeMetadataWrite() error {
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if img.lazyRefcounts() && !img.dirtyBitSet {
		return img.setDirtyBit(true)
	}
	return nil
}

// setDirtyBit sets or clears the dirty bit with a synced write of the
// incompatible features field alone. Before clearing it, the refcounts
// must be on disk (the caller flushed the caches).
func (img *Image) setDirtyBit(dirty bool) error {
	if img.hdr.Version < 3 {
		return nil
	}
	f := img.hdr.IncompatibleFeatures &^ IncompatDirty
	if dirty {
		f |= IncompatDirty
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], f)
	if err := img.writeSync(b[:], 72); err != nil {
		return err
	}
	img.hdr.IncompatibleFeatures = f
	img.dirtyBitSet = dirty
	return nil
}

// markCorrupt sets the corrupt bit (qcow2_mark_corrupt) and stops all
// further writes, then returns QEMU's message for the event.
func (img *Image) markCorrupt(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	img.setCorruptBit(msg)
	return fmt.Errorf("%s: Marking image as corrupt: %s: %w", img.file.Name(), msg, formats.ErrCorrupt)
}

// corruptOnWrite marks the image corrupt when a write ran into corrupt
// metadata (QEMU's qcow2_signal_corruption on the write path) and
// returns err.
func (img *Image) corruptOnWrite(err error) error {
	if errors.Is(err, formats.ErrCorrupt) && !img.readOnly {
		img.setCorruptBit(err.Error())
	}
	return err
}

func (img *Image) setCorruptBit(msg string) {
	if !img.readOnly && img.hdr.Version >= 3 {
		f := img.hdr.IncompatibleFeatures | IncompatCorrupt
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], f)
		if err := img.writeSync(b[:], 72); err == nil {
			img.hdr.IncompatibleFeatures = f
		}
	}
	if !img.readOnly {
		img.warnf("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", msg)
	}
	img.readOnly = true
}

// checkOverlap refuses to hand out host clusters that hold metadata
// (qcow2_check_metadata_overlap): it means the refcounts are wrong, and
// using the clusters would destroy the image. The image is marked
// corrupt.
func (img *Image) checkOverlap(off, n uint64) error {
	if name := img.metadataAt(off, n); name != "" {
		return img.markCorrupt("Preventing invalid allocation at offset %#x (overlaps with %s)", off, name)
	}
	return nil
}

// tablesChanged drops the sorted offsets of the L1 and refcount tables
// after a change that setL1 did not make.
func (img *Image) tablesChanged() { img.l2Sorted, img.rbSorted = nil, nil }

// sortedOffsets returns the non-zero host offsets of a table of
// pointers in order (with duplicates when a corrupt table has them),
// never nil.
func sortedOffsets(table []uint64) []uint64 {
	s := []uint64{}
	for _, e := range table {
		if off := e & OffsetMask; off != 0 {
			s = append(s, off)
		}
	}
	slices.Sort(s)
	return s
}

// metadataAt names the metadata structure overlapping [off, off+n), or "".
func (img *Image) metadataAt(off, n uint64) string {
	cs := uint64(img.lay.ClusterSize)
	overlaps := func(start, length uint64) bool {
		return length > 0 && start < off+n && off < start+length
	}
	switch {
	case overlaps(0, cs):
		return "qcow2_header"
	case overlaps(img.hdr.L1TableOffset, uint64(len(img.l1))*8):
		return "active L1 table"
	case overlaps(img.hdr.RefcountTableOffset, uint64(len(img.reftable))*8):
		return "refcount table"
	}
	if img.rbSorted == nil {
		img.rbSorted = sortedOffsets(img.reftable)
	}
	if img.l2Sorted == nil {
		img.l2Sorted = sortedOffsets(img.l1)
	}
	// Only the first cluster that ends after off can be the first to
	// overlap: the sorted offsets spare a scan of the tables (32768 L1
	// entries for 16 TiB) on every allocation.
	firstOverlap := func(sorted []uint64) bool {
		j, _ := slices.BinarySearch(sorted, max(off, cs-1)-(cs-1))
		return j < len(sorted) && overlaps(sorted[j], cs)
	}
	switch {
	case firstOverlap(img.rbSorted):
		return "refcount block"
	case firstOverlap(img.l2Sorted):
		return "active L2 table"
	}
	if len(img.snapshots) > 0 {
		last := img.snapshots[len(img.snapshots)-1]
		if overlaps(img.hdr.SnapshotsOffset, last.Offset+last.Len-img.hdr.SnapshotsOffset) {
			return "snapshot table"
		}
	}
	for _, sn := range img.snapshots {
		if overlaps(sn.L1TableOffset, uint64(sn.L1Size)*8) {
			return "inactive L1 table"
		}
	}
	if b := img.hdr.Bitmaps; b != nil && overlaps(b.DirectoryOff, b.DirectorySize) {
		return "bitmap directory"
	}
	return ""
}
