package qcow2

import (
	"encoding/binary"
	"slices"

	"github.com/imgfs/imgfs/formats"
)

// Everything in this file runs with img.mu held.

// mapping is a run of guest bytes that one lookup resolved to a single
// kind of storage.
type mapping struct {
	length int64
	typ    ClusterType
	// host is the host offset of the first byte for Normal, ZeroAlloc
	// and UnallocatedAlloc runs (in img.data).
	host uint64
	// copied: every cluster of the run has the COPIED flag, so it may be
	// written in place.
	copied bool
	// entry is the L2 entry of a Compressed run (always one cluster).
	entry L2Entry
}

// l2Offset returns the host offset of the L2 table for L1 index i, 0 when
// unallocated.
func (img *Image) l2Offset(i int64) (uint64, error) { return img.l2OffsetIn(img.l1, i) }

// l2OffsetIn is l2Offset in the L1 table l1 (the active one or a
// snapshot's).
func (img *Image) l2OffsetIn(l1 []uint64, i int64) (uint64, error) {
	if i >= int64(len(l1)) {
		return 0, nil
	}
	e := l1[i]
	off := e & OffsetMask
	if off != 0 && off&uint64(img.lay.ClusterSize-1) != 0 {
		return 0, img.corruptf("L2 table offset %#x unaligned (L1 index: %#x)", off, i)
	}
	return off, nil
}

// l2Table returns the cached L2 table at host offset off. It is valid
// until the next l2Table or writableL2 call, which may reuse its memory.
func (img *Image) l2Table(off uint64) (*cachedTable, error) { return img.loadL2(off, false) }

// loadL2 is l2Table; walking says the table is loaded by a walk in L1
// order (tableCache.spare).
func (img *Image) loadL2(off uint64, walking bool) (*cachedTable, error) {
	if t := img.l2Cache.get(off); t != nil {
		return t, nil
	}
	buf, err := img.l2Cache.spare(int(img.lay.ClusterSize), walking)
	if err != nil {
		return nil, err
	}
	if err := img.readClusterInto(buf, off); err != nil {
		return nil, err
	}
	return img.l2Cache.add(off, buf, false)
}

// willNeedCluster starts reading the metadata cluster at host offset off.
func (img *Image) willNeedCluster(off uint64) { img.file.WillNeed(int64(off), img.lay.ClusterSize) }

// lookup resolves guest bytes [off, off+maxLen) up to the first change of
// storage kind, host contiguity or COPIED flag, and never past the end
// of one L2 table or one compressed cluster. maxLen > 0.
func (img *Image) lookup(off, maxLen int64) (mapping, error) { return img.lookupIn(nil, off, maxLen) }

// lookupIn is lookup through the L1 table l1; nil means the active one.
func (img *Image) lookupIn(l1 []uint64, off, maxLen int64) (mapping, error) {
	if l1 == nil {
		l1 = img.l1
	}
	lay := &img.lay
	l1i := lay.L1Index(off)
	maxLen = min(maxLen, (l1i+1)*lay.L1Coverage()-off)
	l2off, err := img.l2OffsetIn(l1, l1i)
	if err != nil {
		return mapping{}, err
	}
	if l2off == 0 {
		return mapping{length: maxLen, typ: Unallocated}, nil
	}
	t := img.l2Cache.get(l2off)
	if t == nil {
		walking := img.l2Ahead.miss(int64(len(l1)), func(j int64) uint64 { return l1[j] }, l1i, img.willNeedCluster)
		if t, err = img.loadL2(l2off, walking); err != nil {
			return mapping{}, err
		}
	}
	var m mapping
	pos := off
	end := off + maxLen
	for pos < end {
		i := lay.L2Index(pos)
		e := lay.ReadL2Entry(t.data, i)
		if e == (L2Entry{}) {
			// All-zero entries are unallocated clusters; a sparse
			// table holds thousands in a row, taken in one step.
			if pos != off && (m.typ != Unallocated || m.copied) {
				break
			}
			if pos == off {
				m = mapping{typ: Unallocated}
			}
			clusters := lay.zeroEntries(t.data, i, (end-pos+lay.ClusterSize-1)/lay.ClusterSize)
			n := min(end, pos&^(lay.ClusterSize-1)+clusters*lay.ClusterSize) - pos
			m.length += n
			pos += n
			continue
		}
		sc := (pos & (lay.ClusterSize - 1)) / lay.SubclusterSize
		typ := lay.SubclusterType(e, int(sc))
		if err := img.checkEntry(e, typ, l2off, i); err != nil {
			return mapping{}, err
		}
		var host uint64
		if typ == Normal || typ == ZeroAlloc || typ == UnallocatedAlloc {
			host = e.HostOffset() + uint64(pos&(lay.ClusterSize-1))
		}
		// Subclusters up to the end of this one's cluster share the entry.
		n := min(end, (pos|(lay.SubclusterSize-1))+1) - pos
		if pos == off {
			m = mapping{typ: typ, host: host, copied: e.Copied(), entry: e}
		} else if typ != m.typ || typ == Compressed || e.Copied() != m.copied ||
			(host != 0 || m.host != 0) && host != m.host+uint64(m.length) {
			break
		}
		m.length += n
		pos += n
		if typ == Compressed {
			// One compressed cluster at most.
			m.length = min((off|(lay.ClusterSize-1))+1, end) - off
			break
		}
	}
	return m, nil
}

// checkEntry rejects entries QEMU treats as corruption on access
// (qcow2_get_host_offset): unaligned cluster offsets, zero flags in v2
// images, invalid subcluster bitmaps.
func (img *Image) checkEntry(e L2Entry, typ ClusterType, l2off uint64, i int64) error {
	switch typ {
	case Invalid:
		return img.corruptf("Invalid cluster entry found (L2 offset: %#x, L2 index: %#x)", l2off, i)
	case ZeroPlain, ZeroAlloc:
		if img.hdr.Version < 3 {
			return img.corruptf("Zero cluster entry found in pre-v3 image (L2 offset: %#x, L2 index: %#x)", l2off, i)
		}
	case Compressed:
		if img.lay.HasDataFile {
			return img.corruptf("Compressed cluster entry found in image with external data file (L2 offset: %#x, L2 index: %#x)", l2off, i)
		}
	}
	if (typ == Normal || typ == ZeroAlloc || typ == UnallocatedAlloc) && e.HostOffset()&uint64(img.lay.ClusterSize-1) != 0 {
		return img.corruptf("Cluster allocation offset %#x unaligned (L2 offset: %#x, L2 index: %#x)", e.HostOffset(), l2off, i)
	}
	return nil
}

// writableL2 returns the L2 table for L1 index i, ready to be modified:
// allocated when missing and copied when shared with a snapshot (no
// COPIED flag), as QEMU's l2_allocate. The new table reaches the disk
// before the L1 entry that points to it.
func (img *Image) writableL2(i int64) (*cachedTable, error) {
	old, err := img.l2Offset(i)
	if err != nil {
		return nil, err
	}
	if i >= int64(len(img.l1)) {
		return nil, img.corruptf("guest offset beyond the L1 table (index %d of %d)", i, len(img.l1))
	}
	if old != 0 && img.l1[i]&OflagCopied != 0 {
		return img.l2Table(old)
	}
	data, err := img.l2Cache.spare(int(img.lay.ClusterSize), false)
	if err != nil {
		return nil, err
	}
	if old != 0 {
		t, err := img.l2Table(old)
		if err != nil {
			return nil, err
		}
		copy(data, t.data)
	} else {
		clear(data)
	}
	off, err := img.allocClusters(1)
	if err != nil {
		return nil, err
	}
	nt := cachedTable{offset: off, data: data}
	if old == 0 {
		if nt.zeroOnDisk, err = img.zeroSegments(off); err != nil {
			return nil, err
		}
	}
	// The new table's refcount, then the table, then the L1 entry.
	if !img.lazyRefcounts() {
		if err := img.flushRefcounts(); err != nil {
			return nil, err
		}
	}
	if err := img.storeTable(&nt); err != nil {
		return nil, err
	}
	if err := img.file.Sync(); err != nil {
		return nil, err
	}
	if err := img.setL1(i, off|OflagCopied); err != nil {
		return nil, err
	}
	if old != 0 {
		if err := img.updateRefcounts(int64(old>>img.lay.ClusterBits), 1, -1); err != nil {
			return nil, err
		}
	}
	t, err := img.l2Cache.add(off, data, false)
	if err != nil {
		return nil, err
	}
	t.zeroOnDisk = nt.zeroOnDisk
	return t, nil
}

// zeroSegments returns the zeroOnDisk bits of a new table at host offset
// off: a table past the end of the file reads as zeroes except for its
// last segment, which is written at once so that the file covers the
// whole table as in QEMU's images (qemu-img check reports clusters past
// the end).
func (img *Image) zeroSegments(off uint64) (uint64, error) {
	if past, err := img.file.PastEnd(int64(off)); err != nil || !past {
		return 0, err
	}
	n := img.lay.ClusterSize / img.lay.tableSegment()
	return 1<<(n-1) - 1, nil
}

// storeTable writes a cached table to its cluster, leaving out the
// segments that are zero and still read as zeroes on disk: the tables
// of a 16 TiB image with clusters scattered over it use one entry in
// 8192, and writing them whole would fill the page cache and the disk
// with zeroes.
func (img *Image) storeTable(t *cachedTable) error {
	if t.zeroOnDisk == 0 {
		_, err := img.file.WriteAt(t.data, int64(t.offset))
		return err
	}
	seg := img.lay.tableSegment()
	n := int64(len(t.data)) / seg
	skip := func(i int64) bool {
		return t.zeroOnDisk&(1<<i) != 0 && formats.IsZero(t.data[i*seg:(i+1)*seg])
	}
	for i := int64(0); i < n; {
		if skip(i) {
			i++
			continue
		}
		j := i + 1
		for j < n && !skip(j) {
			j++
		}
		if _, err := img.file.WriteAt(t.data[i*seg:j*seg], int64(t.offset)+i*seg); err != nil {
			return err
		}
		t.zeroOnDisk &^= 1<<j - 1<<i
		i = j
	}
	return nil
}

// setL1 updates L1 entry i in memory and on disk.
func (img *Image) setL1(i int64, e uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], e)
	if err := img.writeSync(b[:], img.hdr.L1TableOffset+uint64(i)*8); err != nil {
		return err
	}
	if s := img.l2Sorted; s != nil {
		if off := img.l1[i] & OffsetMask; off != 0 {
			if j, found := slices.BinarySearch(s, off); found {
				s = slices.Delete(s, j, j+1)
			}
		}
		if off := e & OffsetMask; off != 0 {
			j, _ := slices.BinarySearch(s, off)
			s = slices.Insert(s, j, off)
		}
		img.l2Sorted = s
	}
	img.l1[i] = e
	return nil
}

// freeEntry drops the host storage an L2 entry referenced, after the
// entry itself was changed in the cache (qcow2_free_any_cluster).
// punch deallocates freed data clusters in the host file.
func (img *Image) freeEntry(e L2Entry, punch bool) error {
	lay := &img.lay
	switch lay.ClusterType(e) {
	case Compressed:
		host, size := lay.CompressedDescriptor(e)
		first := int64(host >> lay.ClusterBits)
		last := int64((host + uint64(size) - 1) >> lay.ClusterBits)
		return img.freeClusters(first, last-first+1, punch)
	case Normal, ZeroAlloc:
		if lay.HasDataFile {
			// Data file clusters have no refcounts.
			if punch {
				return img.data.PunchHole(int64(e.HostOffset()), lay.ClusterSize)
			}
			return nil
		}
		return img.freeClusters(int64(e.HostOffset()>>lay.ClusterBits), 1, punch)
	}
	return nil
}

// freeClusters drops one reference from n clusters, punching those that
// become free when punch is set.
func (img *Image) freeClusters(c, n int64, punch bool) error {
	if err := img.updateRefcounts(c, n, -1); err != nil {
		return err
	}
	if !punch {
		return nil
	}
	for i := c; i < c+n; i++ {
		rc, err := img.Refcount(i)
		if err != nil {
			return err
		}
		if rc == 0 {
			// Best effort: a file system without hole punching
			// just keeps the old bytes.
			_ = img.file.PunchHole(i<<img.lay.ClusterBits, img.lay.ClusterSize)
		}
	}
	return nil
}
