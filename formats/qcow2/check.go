package qcow2

// This file is `qemu-img check` for qcow2: QEMU 7.2's qcow2_co_check_locked
// with qcow2_check_refcounts (block/qcow2-refcount.c), the snapshot table
// checks (block/qcow2-snapshot.c) and the bitmap refcount walk
// (block/qcow2-bitmap.c). The counters and the messages follow QEMU's
// exactly, because `qemu-img check` output is part of our contract.
//
// A check builds an in-memory refcount table (one big refcount block for
// the whole host file) by walking every structure that references
// clusters, then compares it with the refcounts on disk. Repairs are
// ordinary file writes in QEMU's order: changed refcount blocks (cached
// during the check and written at its end, as QEMU's refcount cache),
// L1/L2 entries, and, when the refcount structure itself is broken, a new
// refcount structure written from the in-memory table before the header
// is switched to it. Repaired images come out byte for byte as QEMU
// leaves them.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// Masks of refcount table entries (REFT_OFFSET_MASK, REFT_RESERVED_MASK)
// and of bitmap table entries (BME_TABLE_ENTRY_*).
const (
	reftOffsetMask   = 0xfffffffffffffe00
	reftReservedMask = 0x1ff

	bmeTableReservedMask = 0xff000000000001fe
	bmeTableOffsetMask   = 0x00fffffffffffe00
	bmeTableAllOnes      = 1
	bmeMaxTableSize      = 0x8000000
	bmeMaxPhysSize       = 0x20000000

	l2BitmapAllAlloc = 1<<32 - 1
	l2BitmapAllZero  = l2BitmapAllAlloc << 32
)

// maxRefcountArrayBytes bounds the in-memory refcount table. QEMU sizes it
// by the host file (at most INT_MAX clusters) and lets the allocation
// fail; a sparse hostile file could ask for many GiB, so imgfs refuses
// beyond 1 GiB (2^29 clusters with 16-bit refcounts). A variable so that
// the fuzz test can keep its runs small.
var maxRefcountArrayBytes int64 = 1 << 30

// fixFlags are QEMU's BdrvCheckMode bits.
type fixFlags uint8

const (
	fixLeaks fixFlags = 1 << iota
	fixErrors
)

func fixFor(mode formats.CheckMode) fixFlags {
	switch mode {
	case formats.CheckFixLeaks:
		return fixLeaks
	case formats.CheckFixAll:
		return fixLeaks | fixErrors
	}
	return 0
}

// checkFragInfo asks the L1/L2 walk to count allocation statistics; only
// the active L1 table does (QEMU's CHECK_FRAG_INFO).
const checkFragInfo = 2

// Errors of a failed check. Their text is what qemu-img prints after
// "Check failed: " (strerror of QEMU's return code).
var (
	errCheckIO       = formats.ErrnoError{Err: syscall.EIO}
	errCheckInvalid  = formats.ErrnoError{Err: syscall.EINVAL}
	errCheckTooLarge = formats.ErrnoError{Err: syscall.EFBIG}
)

// refcountArray is the in-memory refcount table (QEMU's IMRT): n entries
// of the image's refcount width, packed as in a refcount block, in a
// buffer rounded up to whole clusters so that slices of it can be
// written out as refcount blocks.
type refcountArray struct {
	order       uint32
	clusterSize int64
	n           int64
	buf         []byte
}

func (a *refcountArray) bytesFor(n int64) int64 {
	b := (n<<a.order + 7) / 8
	return (b + a.clusterSize - 1) / a.clusterSize * a.clusterSize
}

// resize is QEMU's realloc_refcount_array: new entries are zero.
func (a *refcountArray) resize(n int64) error {
	nb := int64(math.MaxInt64)
	if n >= 0 && n <= 1<<56 {
		// (No overflow: at most 2^56 entries of at most 64 bits.)
		nb = a.bytesFor(n)
	}
	if nb > maxRefcountArrayBytes {
		// Worded for "Check failed: ..."; QEMU would fail the same way
		// when its allocation fails.
		return fmt.Errorf("refcounts of %d clusters need %d bytes of memory, more than the %d imgfs allows: %w",
			n, nb, maxRefcountArrayBytes, formats.ErrnoError{Err: syscall.ENOMEM})
	}
	switch {
	case nb > int64(len(a.buf)):
		a.buf = append(a.buf, make([]byte, nb-int64(len(a.buf)))...)
	case nb < int64(len(a.buf)):
		a.buf = a.buf[:nb]
	}
	a.n = n
	return nil
}

func (a *refcountArray) get(i int64) uint64    { return GetRefcount(a.buf, i, a.order) }
func (a *refcountArray) set(i int64, v uint64) { SetRefcount(a.buf, i, a.order, v) }

// Metadata overlap bits (QCOW2_OL_*), in QEMU's order, and the "cached"
// template qemu-img uses by default.
const (
	olMainHeader = 1 << iota
	olActiveL1
	olActiveL2
	olRefcountTable
	olRefcountBlock
	olSnapshotTable
	olInactiveL1
	olInactiveL2
	olBitmapDirectory

	olCached = olMainHeader | olActiveL1 | olActiveL2 | olRefcountTable | olRefcountBlock |
		olSnapshotTable | olInactiveL1 | olBitmapDirectory
)

var overlapNames = [...]string{
	"qcow2_header", "active L1 table", "active L2 table", "refcount table",
	"refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
	"bitmap directory",
}

// checker is one run of the check over an image's metadata: the state
// QEMU keeps in BDRVQcow2State that the check reads and repairs.
type checker struct {
	ctx    context.Context
	f      *formats.File
	h      Header // the image's header; repairs update the copy too
	l      Layout
	fix    fixFlags
	report func(string)
	// writable: corruption found while repairing is fatal (marks the
	// image corrupt) as in qcow2_signal_corruption.
	writable bool
	// signaled: a corruption event was reported. QEMU reports one per
	// open image; imgfs one per check run.
	signaled bool
	// fatal is set once a fatal corruption made the image unusable.
	fatal bool

	fileLen   int64
	reftable  []uint64
	l1        []uint64
	snapshots []SnapshotEntry
	// snapshotsSize is the byte length of the snapshot table without
	// the padding after its last entry, as QEMU computes it.
	snapshotsSize int64

	// adopted: the driver took over the repaired state (adoptCheckState);
	// from then on the driver's copy is the current one.
	adopted bool

	// rbOff/rb cache the on-disk refcount block last read; dirtyRB
	// holds changed blocks by offset until flushRefblocks.
	rbOff   int64
	rb      []byte
	dirtyRB map[int64][]byte
}

func (c *checker) printf(format string, args ...any) {
	if c.report != nil {
		c.report(fmt.Sprintf(format, args...))
	}
}

// hexAlt prints v as C's "%#" PRIx64 does: "0" for zero, else 0x-prefixed.
func hexAlt(v uint64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}

// strerror renders an I/O error as QEMU's strerror(-ret).
func strerror(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return formats.ErrnoError{Err: errno}.Error()
	}
	return err.Error()
}

// asErrno makes an errno the check's error, so that "Check failed: "
// reads like QEMU's; other errors are returned as they are.
func asErrno(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return formats.ErrnoError{Err: errno}
	}
	var ee formats.ErrnoError
	if errors.As(err, &ee) {
		return ee
	}
	return err
}

func (c *checker) sizeToClusters(size int64) int64 {
	return (size + c.l.ClusterSize - 1) >> c.l.ClusterBits
}

func (c *checker) offsetIntoCluster(off uint64) uint64 { return off & uint64(c.l.ClusterSize-1) }

// readAt reads len(p) bytes at a host offset that came from the image;
// offsets beyond int64 fail as QEMU's request checks do.
func (c *checker) readAt(p []byte, off uint64) error {
	if off > math.MaxInt64-uint64(len(p)) {
		return errCheckIO
	}
	_, err := c.f.ReadAt(p, int64(off))
	return err
}

// writeAt writes p and keeps the cached file length current (writes may
// extend the file).
func (c *checker) writeAt(p []byte, off uint64) error {
	if off > math.MaxInt64-uint64(len(p)) {
		return errCheckIO
	}
	if _, err := c.f.WriteAt(p, int64(off)); err != nil {
		return err
	}
	c.fileLen = max(c.fileLen, int64(off)+int64(len(p)))
	return nil
}

// signalCorruption is qcow2_signal_corruption: one message per open
// image; when the image is writable the corruption is fatal: the corrupt
// bit is set and the check cannot go on writing.
func (c *checker) signalCorruption(fatal bool, msg string) {
	fatal = fatal && c.writable
	if c.signaled && (!fatal || c.h.IncompatibleFeatures&IncompatCorrupt != 0) {
		return
	}
	if fatal {
		c.printf("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", msg)
		c.h.IncompatibleFeatures |= IncompatCorrupt
		// Best effort, as qcow2_mark_corrupt: the check fails anyway.
		_ = c.writeIncompatible()
		c.fatal = true
	} else {
		c.printf("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", msg)
	}
	c.signaled = true
}

// writeIncompatible stores the incompatible feature bits (v3 only; v2
// images have neither a dirty nor a corrupt bit on disk).
func (c *checker) writeIncompatible() error {
	if c.h.Version < 3 {
		return nil
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], c.h.IncompatibleFeatures)
	if err := c.writeAt(b[:], 72); err != nil {
		return err
	}
	return c.f.Sync()
}

// metadataRefs is what qcow2_check_metadata_overlap looks at: where the
// image's metadata lives.
type metadataRefs struct {
	hdr         *Header
	clusterSize uint64
	l1          []uint64
	reftable    []uint64
	snapshots   []SnapshotEntry
	// snapshotsSize is the snapshot table's length in bytes.
	snapshotsSize uint64
}

// overlap is qcow2_check_metadata_overlap with the "cached" template
// that QEMU uses by default, minus the checks in ign: the first metadata
// structure (an ol* bit, in QEMU's order) that [off, off+size) touches
// once widened to whole clusters, or 0.
func (m metadataRefs) overlap(ign int, off, size uint64) int {
	chk := olCached &^ ign
	if size == 0 {
		return 0
	}
	cs := m.clusterSize
	if chk&olMainHeader != 0 && off < cs {
		return olMainHeader
	}
	size = (off&(cs-1) + size + cs - 1) &^ (cs - 1)
	off &^= cs - 1
	hit := func(o, n uint64) bool { return n > 0 && o < off+size && off < o+n }
	h := m.hdr
	if chk&olActiveL1 != 0 && hit(h.L1TableOffset, uint64(len(m.l1))*8) {
		return olActiveL1
	}
	if chk&olRefcountTable != 0 && hit(h.RefcountTableOffset, uint64(len(m.reftable))*8) {
		return olRefcountTable
	}
	if chk&olSnapshotTable != 0 && hit(h.SnapshotsOffset, m.snapshotsSize) {
		return olSnapshotTable
	}
	if chk&olInactiveL1 != 0 {
		for _, sn := range m.snapshots {
			if hit(sn.L1TableOffset, uint64(sn.L1Size)*8) {
				return olInactiveL1
			}
		}
	}
	if chk&olActiveL2 != 0 {
		for _, e := range m.l1 {
			if o := e & OffsetMask; o != 0 && hit(o, cs) {
				return olActiveL2
			}
		}
	}
	if chk&olRefcountBlock != 0 {
		for _, e := range m.reftable {
			if o := e & reftOffsetMask; o != 0 && hit(o, cs) {
				return olRefcountBlock
			}
		}
	}
	// Inactive L2 tables are not in the "cached" template.
	if chk&olBitmapDirectory != 0 && h.Bitmaps != nil && hit(h.Bitmaps.DirectoryOff, h.Bitmaps.DirectorySize) {
		return olBitmapDirectory
	}
	return 0
}

// overlapName names an ol* bit as QEMU's messages do.
func overlapName(ol int) string {
	return overlapNames[bits.TrailingZeros(uint(ol))]
}

// preWriteOverlapCheck is qcow2_pre_write_overlap_check: a write that
// would hit metadata is refused with EIO and signals a fatal corruption.
func (c *checker) preWriteOverlapCheck(ign int, off, size uint64) error {
	refs := metadataRefs{
		hdr:           &c.h,
		clusterSize:   uint64(c.l.ClusterSize),
		l1:            c.l1,
		reftable:      c.reftable,
		snapshots:     c.snapshots,
		snapshotsSize: uint64(c.snapshotsSize),
	}
	ol := refs.overlap(ign, off, size)
	if ol == 0 {
		return nil
	}
	c.signalCorruption(true, "Preventing invalid write on metadata (overlaps with "+overlapName(ol)+")")
	return errCheckIO
}

// diskRefcount is qcow2_get_refcount: the refcount stored on disk for a
// cluster, 0 where the refcount table has no block.
func (c *checker) diskRefcount(cluster int64) (uint64, error) {
	idx := uint64(cluster) >> c.l.RefblockBits
	if idx >= uint64(len(c.reftable)) {
		return 0, nil
	}
	off := c.reftable[idx] & reftOffsetMask
	if off == 0 {
		return 0, nil
	}
	if c.offsetIntoCluster(off) != 0 {
		c.signalCorruption(true, fmt.Sprintf("Refblock offset %s unaligned (reftable index: %s)", hexAlt(off), hexAlt(idx)))
		return 0, errCheckIO
	}
	block, err := c.refblock(int64(off))
	if err != nil {
		return 0, err
	}
	return GetRefcount(block, cluster&(c.l.RefblockEntries-1), c.l.RefcountOrder), nil
}

// refblock returns the refcount block at off: a changed one from
// c.dirtyRB, else the last one read, else it reads it.
func (c *checker) refblock(off int64) ([]byte, error) {
	// c.rb is never an outdated copy of a changed block: a changed
	// block is the very slice c.rb held, or c.rb is made to hold it.
	if c.rb != nil && c.rbOff == off {
		return c.rb, nil
	}
	if b, ok := c.dirtyRB[off]; ok {
		c.rb, c.rbOff = b, off
		return b, nil
	}
	buf := make([]byte, c.l.ClusterSize)
	if err := c.readAt(buf, uint64(off)); err != nil {
		return nil, err
	}
	c.rb, c.rbOff = buf, off
	return buf, nil
}

// updateRefcount is update_refcount for one cluster whose refcount block
// exists (compare_refcounts only fixes those): it changes the refcount by
// addend in the cached block. As in QEMU's refcount block cache, the
// change reaches the disk when the cache is flushed.
func (c *checker) updateRefcount(cluster int64, addend uint64, decrease bool) error {
	cur, err := c.diskRefcount(cluster)
	if err != nil {
		return err
	}
	var v uint64
	if decrease {
		if addend > cur {
			return errCheckInvalid
		}
		v = cur - addend
	} else {
		v = cur + addend
		if v < cur || v > MaxRefcount(c.l.RefcountOrder) {
			return errCheckInvalid
		}
	}
	off := int64(c.reftable[cluster>>c.l.RefblockBits] & reftOffsetMask)
	block, err := c.refblock(off)
	if err != nil {
		return err
	}
	if c.dirtyRB == nil {
		c.dirtyRB = map[int64][]byte{}
	}
	c.dirtyRB[off] = block
	SetRefcount(block, cluster&(c.l.RefblockEntries-1), c.l.RefcountOrder, v)
	if v == 0 {
		// A freed cluster leaves the cache (it may have been a
		// refcount block itself) and, with QCOW2_DISCARD_ALWAYS, is
		// discarded in the file at once (discard=unmap is the file
		// layer's default). A failed discard changes nothing QEMU
		// cares about.
		freed := cluster << c.l.ClusterBits
		delete(c.dirtyRB, freed)
		if c.rbOff == freed {
			c.rb = nil
		}
		_ = c.f.PunchHole(freed, c.l.ClusterSize)
	}
	return nil
}

// flushRefblocks writes the changed refcount blocks, in offset order, and
// forgets every cached block.
func (c *checker) flushRefblocks() error {
	offs := make([]int64, 0, len(c.dirtyRB))
	for off := range c.dirtyRB {
		offs = append(offs, off)
	}
	slices.Sort(offs)
	for _, off := range offs {
		if err := c.writeAt(c.dirtyRB[off], uint64(off)); err != nil {
			return err
		}
		delete(c.dirtyRB, off)
	}
	c.rb = nil
	return nil
}

// incRefcounts is qcow2_inc_refcounts_imrt: count one more reference to
// every cluster of [off, off+size).
func (c *checker) incRefcounts(res *formats.CheckResult, a *refcountArray, off, size uint64) error {
	if size == 0 {
		return nil
	}
	cs := uint64(c.l.ClusterSize)
	// The last cluster may be partly past the end of the file, not more.
	if off > math.MaxInt64-size || off+size >= uint64(c.fileLen)+cs {
		c.printf("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x%x size 0x%x", off, size)
		res.Corruptions++
		return nil
	}
	first := int64(off >> c.l.ClusterBits)
	last := int64((off + size - 1) >> c.l.ClusterBits)
	max := MaxRefcount(c.l.RefcountOrder)
	for k := first; k <= last; k++ {
		if k >= a.n {
			if err := a.resize(k + 1); err != nil {
				res.CheckErrors++
				return err
			}
		}
		r := a.get(k)
		if r == max {
			c.printf("ERROR: overflow cluster offset=0x%x", uint64(k)<<c.l.ClusterBits)
			c.printf("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
			res.Corruptions++
			continue
		}
		a.set(k, r+1)
	}
	return nil
}

// fixL2EntryByZero is fix_l2_entry_by_zero: turn entry i of the L2 table
// at l2Off into a zero cluster (zero subclusters with extended L2). The
// caller has counted the corruption. overlap reports a refused write.
func (c *checker) fixL2EntryByZero(res *formats.CheckResult, l2Off uint64, table []byte, i int64, active bool) (overlap bool, err error) {
	e := c.l.ReadL2Entry(table, i)
	if c.l.ExtendedL2 {
		bm := e.Bitmap | e.Bitmap<<32
		e = L2Entry{Raw: 0, Bitmap: bm & l2BitmapAllZero}
	} else {
		e = L2Entry{Raw: OflagZero}
	}
	c.l.WriteL2Entry(table, i, e)
	ign := olInactiveL2
	if active {
		ign = olActiveL2
	}
	entryOff := l2Off + uint64(i*c.l.L2EntrySize)
	if err := c.preWriteOverlapCheck(ign, entryOff, uint64(c.l.L2EntrySize)); err != nil {
		c.printf("ERROR: Overlap check failed")
		res.CheckErrors++
		return true, err
	}
	if err := c.writeAt(table[i*c.l.L2EntrySize:(i+1)*c.l.L2EntrySize], entryOff); err != nil {
		c.printf("ERROR: Failed to overwrite L2 table entry: %s", strerror(err))
		res.CheckErrors++
		return false, err
	}
	if err := c.f.Sync(); err != nil {
		c.printf("ERROR: Failed to overwrite L2 table entry: %s", strerror(err))
		res.CheckErrors++
		return false, err
	}
	res.Corruptions--
	res.CorruptionsFixed++
	return false, nil
}

// checkL2 is check_refcounts_l2: count the clusters an L2 table
// references and check its entries.
func (c *checker) checkL2(res *formats.CheckResult, a *refcountArray, l2Off uint64, flags int, fix fixFlags, active bool) error {
	table := make([]byte, c.l.ClusterSize)
	if err := c.readAt(table, l2Off); err != nil {
		c.printf("ERROR: I/O error in check_refcounts_l2")
		res.CheckErrors++
		return asErrno(err)
	}
	var nextContiguous uint64
	for i := int64(0); i < c.l.L2Entries; i++ {
		e := c.l.ReadL2Entry(table, i)
		if e == (L2Entry{}) {
			i += c.l.zeroEntries(table, i, c.l.L2Entries) - 1 // nothing to check
			continue
		}
		typ := c.l.ClusterType(e)
		if typ != Compressed && e.Raw&L2Reserved != 0 {
			c.printf("ERROR found l2 entry with reserved bits set: %x", e.Raw)
			res.Corruptions++
		}
		switch typ {
		case Compressed:
			if e.Copied() {
				c.printf("ERROR: coffset=0x%x: copied flag must never be set for compressed clusters", e.Raw&(1<<c.l.CsizeShift-1))
				e.Raw &^= OflagCopied
				res.Corruptions++
			}
			if c.l.HasDataFile {
				c.printf("ERROR compressed cluster %d with data file, entry=0x%x", i, e.Raw)
				res.Corruptions++
				continue
			}
			if e.Bitmap != 0 {
				c.printf("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=0x%x", i, e.Raw)
				res.Corruptions++
				continue
			}
			coff, csize := c.l.CompressedDescriptor(e)
			if err := c.incRefcounts(res, a, coff, uint64(csize)); err != nil {
				return err
			}
			if flags&checkFragInfo != 0 {
				// Compressed clusters count as fragmented: adjacent ones
				// still re-read shared sectors.
				res.AllocatedClusters++
				res.CompressedClusters++
				res.FragmentedClusters++
			}
		case ZeroAlloc, Normal:
			off := e.HostOffset()
			if (e.Bitmap>>32)&e.Bitmap != 0 {
				res.Corruptions++
				c.printf("ERROR offset=%x: Allocated cluster has corrupted subcluster allocation bitmap", off)
			}
			if c.offsetIntoCluster(off) != 0 {
				res.Corruptions++
				containsData := e.Raw&OflagZero == 0
				if c.l.ExtendedL2 {
					containsData = e.Bitmap&l2BitmapAllAlloc != 0
				}
				if !containsData {
					c.printf("%s offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.", repairing(fix&fixErrors != 0), off)
					if fix&fixErrors != 0 {
						overlap, err := c.fixL2EntryByZero(res, l2Off, table, i, active)
						if overlap {
							return err
						}
						if err == nil {
							// The entry no longer references the cluster.
							continue
						}
					}
				} else {
					c.printf("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", off)
				}
			}
			if flags&checkFragInfo != 0 {
				res.AllocatedClusters++
				if nextContiguous != 0 && off != nextContiguous {
					res.FragmentedClusters++
				}
				nextContiguous = off + uint64(c.l.ClusterSize)
			}
			if !c.l.HasDataFile {
				if err := c.incRefcounts(res, a, off, uint64(c.l.ClusterSize)); err != nil {
					return err
				}
			}
		case Unallocated:
			if e.Bitmap&l2BitmapAllAlloc != 0 {
				res.Corruptions++
				c.printf("ERROR: Unallocated cluster has non-zero subcluster allocation map")
			}
		}
	}
	return nil
}

func repairing(fixing bool) string {
	if fixing {
		return "Repairing"
	}
	return "ERROR"
}

// checkL1 is check_refcounts_l1: count an L1 table, its L2 tables and
// everything they reference.
func (c *checker) checkL1(res *formats.CheckResult, a *refcountArray, l1Off uint64, l1Size uint32, flags int, fix fixFlags, active bool) error {
	if l1Size == 0 {
		return nil
	}
	// Callers bound l1Size by the 32 MiB L1 limit.
	n := uint64(l1Size) * 8
	if err := c.incRefcounts(res, a, l1Off, n); err != nil {
		return err
	}
	buf := make([]byte, n)
	if err := c.readAt(buf, l1Off); err != nil {
		c.printf("ERROR: I/O error in check_refcounts_l1")
		res.CheckErrors++
		return asErrno(err)
	}
	entry := func(j int64) uint64 { return binary.BigEndian.Uint64(buf[8*j:]) }
	var ahead tableReadahead
	ask := func(off uint64) { c.f.WillNeed(int64(off), c.l.ClusterSize) }
	for i := uint64(0); i < uint64(l1Size); i++ {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		e := entry(int64(i))
		if e == 0 {
			continue
		}
		ahead.miss(int64(l1Size), entry, int64(i), ask)
		if e&L1Reserved != 0 {
			c.printf("ERROR found L1 entry with reserved bits set: %x", e)
			res.Corruptions++
		}
		l2Off := e & OffsetMask
		if err := c.incRefcounts(res, a, l2Off, uint64(c.l.ClusterSize)); err != nil {
			return err
		}
		if c.offsetIntoCluster(l2Off) != 0 {
			c.printf("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", l2Off)
			res.Corruptions++
		}
		if err := c.checkL2(res, a, l2Off, flags, fix, active); err != nil {
			return err
		}
	}
	return nil
}

// checkOflagCopied is check_oflag_copied: the COPIED flag of every active
// L1 and L2 entry must say whether the refcount is exactly one.
func (c *checker) checkOflagCopied(res *formats.CheckResult, fix fixFlags) error {
	var repair bool
	switch {
	case fix&fixErrors != 0:
		repair = true
	case fix&fixLeaks != 0:
		// The refcounts were just repaired; trust them only if that
		// left nothing behind.
		repair = res.CheckErrors == 0 && res.Corruptions == 0 && res.Leaks == 0
	}
	table := make([]byte, c.l.ClusterSize)
	for i, l1e := range c.l1 {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		l2Off := l1e & OffsetMask
		if l2Off == 0 {
			continue
		}
		// Errors reading refcounts were reported by the comparison.
		rc, err := c.diskRefcount(int64(l2Off >> c.l.ClusterBits))
		if err != nil {
			continue
		}
		if (rc == 1) != (l1e&OflagCopied != 0) {
			res.Corruptions++
			c.printf("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", repairing(repair), i, l1e, rc)
			if repair {
				ne := l1e &^ OflagCopied
				if rc == 1 {
					ne |= OflagCopied
				}
				if err := c.writeL1Entry(i, ne); err != nil {
					res.CheckErrors++
					return err
				}
				res.Corruptions--
				res.CorruptionsFixed++
			}
		}
		if err := c.readAt(table, l2Off); err != nil {
			c.printf("ERROR: Could not read L2 table: %s", strerror(err))
			res.CheckErrors++
			return asErrno(err)
		}
		dirty := int64(0)
		for j := int64(0); j < c.l.L2Entries; j++ {
			e := c.l.ReadL2Entry(table, j)
			if e == (L2Entry{}) {
				j += c.l.zeroEntries(table, j, c.l.L2Entries) - 1 // unallocated
				continue
			}
			typ := c.l.ClusterType(e)
			if typ != Normal && typ != ZeroAlloc {
				continue
			}
			rc := uint64(1)
			if !c.l.HasDataFile {
				if rc, err = c.diskRefcount(int64(e.HostOffset() >> c.l.ClusterBits)); err != nil {
					continue
				}
			}
			if (rc == 1) != e.Copied() {
				res.Corruptions++
				c.printf("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", repairing(repair), e.Raw, rc)
				if repair {
					e.Raw &^= OflagCopied
					if rc == 1 {
						e.Raw |= OflagCopied
					}
					c.l.WriteL2Entry(table, j, e)
					dirty++
				}
			}
		}
		if dirty > 0 {
			if err := c.preWriteOverlapCheck(olActiveL2, l2Off, uint64(c.l.ClusterSize)); err != nil {
				c.printf("ERROR: Could not write L2 table; metadata overlap check failed: %s", strerror(err))
				res.CheckErrors++
				return err
			}
			if err := c.writeAt(table, l2Off); err != nil {
				c.printf("ERROR: Could not write L2 table: %s", strerror(err))
				res.CheckErrors++
				return asErrno(err)
			}
			res.Corruptions -= dirty
			res.CorruptionsFixed += dirty
		}
	}
	return nil
}

// writeL1Entry is qcow2_write_l1_entry: update the active L1 table in
// memory and on disk.
func (c *checker) writeL1Entry(i int, e uint64) error {
	c.l1[i] = e
	off := c.h.L1TableOffset + uint64(i)*8
	if err := c.preWriteOverlapCheck(olActiveL1, off, 8); err != nil {
		return err
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], e)
	if err := c.writeAt(b[:], off); err != nil {
		return asErrno(err)
	}
	return c.f.Sync()
}

// checkRefblocks is check_refblocks: every refcount block must be aligned,
// inside the file and referenced once; the blocks are counted too. A
// block past the end of the file is repaired by growing the file.
func (c *checker) checkRefblocks(res *formats.CheckResult, a *refcountArray, fix fixFlags, rebuild *bool) error {
	cs := uint64(c.l.ClusterSize)
	for i, e := range c.reftable {
		off := e & reftOffsetMask
		cluster := off >> c.l.ClusterBits
		if e&reftReservedMask != 0 {
			c.printf("ERROR refcount table entry %d has reserved bits set", i)
			res.Corruptions++
			*rebuild = true
			continue
		}
		if c.offsetIntoCluster(off) != 0 {
			c.printf("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			res.Corruptions++
			*rebuild = true
			continue
		}
		if cluster >= uint64(a.n) {
			res.Corruptions++
			c.printf("%s refcount block %d is outside image", repairing(fix&fixErrors != 0), i)
			if fix&fixErrors == 0 {
				continue
			}
			if err := c.growForRefblock(off); err != nil {
				*rebuild = true
				c.printf("ERROR could not resize image: %s", strerror(err))
				continue
			}
			if err := a.resize(c.sizeToClusters(c.fileLen)); err != nil {
				res.CheckErrors++
				return err
			}
			if cluster >= uint64(a.n) {
				*rebuild = true
				c.printf("ERROR could not resize image: %s", strerror(syscall.EINVAL))
				continue
			}
			res.Corruptions--
			res.CorruptionsFixed++
			// The new cluster is zeroes and referenced once now.
			if err := c.incRefcounts(res, a, off, cs); err != nil {
				return err
			}
			continue
		}
		if off != 0 {
			if err := c.incRefcounts(res, a, off, cs); err != nil {
				return err
			}
			if r := a.get(int64(cluster)); r != 1 {
				c.printf("ERROR refcount block %d refcount=%d", i, r)
				res.Corruptions++
				*rebuild = true
			}
		}
	}
	return nil
}

// growForRefblock extends the file so that the refcount block at off
// lies inside it. Sizes the in-memory table could not cover are refused
// before the file is touched.
func (c *checker) growForRefblock(off uint64) error {
	cs := uint64(c.l.ClusterSize)
	if off > math.MaxInt64-cs {
		return syscall.EINVAL
	}
	end := int64(off + cs)
	probe := refcountArray{order: c.l.RefcountOrder, clusterSize: c.l.ClusterSize}
	if probe.bytesFor(c.sizeToClusters(end)) > maxRefcountArrayBytes {
		return syscall.EFBIG
	}
	if err := c.f.Truncate(end); err != nil {
		return err
	}
	n, err := c.f.Size()
	if err != nil {
		return err
	}
	c.fileLen = n
	return nil
}

// calculateRefcounts is calculate_refcounts: build the in-memory refcount
// table from every structure that references clusters.
func (c *checker) calculateRefcounts(res *formats.CheckResult, a *refcountArray, fix fixFlags, rebuild *bool) error {
	cs := uint64(c.l.ClusterSize)
	if err := c.incRefcounts(res, a, 0, cs); err != nil {
		return err
	}
	if err := c.checkL1(res, a, c.h.L1TableOffset, uint32(len(c.l1)), checkFragInfo, fix, true); err != nil {
		return err
	}
	if c.l.HasDataFile && len(c.snapshots) > 0 {
		c.printf("ERROR %d snapshots in image with data file", len(c.snapshots))
		res.Corruptions++
	}
	for _, sn := range c.snapshots {
		if c.offsetIntoCluster(sn.L1TableOffset) != 0 {
			c.printf("ERROR snapshot %s (%s) l1_offset=%s: L1 table is not cluster aligned; snapshot table entry corrupted",
				cString([]byte(sn.ID)), cString([]byte(sn.Name)), hexAlt(sn.L1TableOffset))
			res.Corruptions++
			continue
		}
		if uint64(sn.L1Size) > maxL1Bytes/8 {
			c.printf("ERROR snapshot %s (%s) l1_size=%s: L1 table is too large; snapshot table entry corrupted",
				cString([]byte(sn.ID)), cString([]byte(sn.Name)), hexAlt(uint64(sn.L1Size)))
			res.Corruptions++
			continue
		}
		if err := c.checkL1(res, a, sn.L1TableOffset, sn.L1Size, 0, fix, false); err != nil {
			return err
		}
	}
	if err := c.incRefcounts(res, a, c.h.SnapshotsOffset, uint64(c.snapshotsSize)); err != nil {
		return err
	}
	if err := c.incRefcounts(res, a, c.h.RefcountTableOffset, uint64(len(c.reftable))*8); err != nil {
		return err
	}
	if len(c.h.CryptoExt) >= 16 {
		off := binary.BigEndian.Uint64(c.h.CryptoExt)
		n := binary.BigEndian.Uint64(c.h.CryptoExt[8:])
		if err := c.incRefcounts(res, a, off, n); err != nil {
			return err
		}
	}
	if err := c.checkBitmaps(res, a); err != nil {
		return err
	}
	return c.checkRefblocks(res, a, fix, rebuild)
}

// checkBitmaps is qcow2_check_bitmaps_refcounts: count the bitmap
// directory, the bitmap tables and the bitmap data clusters. A directory
// or table QEMU cannot load fails the whole check.
func (c *checker) checkBitmaps(res *formats.CheckResult, a *refcountArray) error {
	ext := c.h.Bitmaps
	if ext == nil {
		return nil
	}
	if err := c.incRefcounts(res, a, ext.DirectoryOff, ext.DirectorySize); err != nil {
		return err
	}
	entries, err := ReadBitmapDirectory(c.f, &c.h)
	if err == nil {
		err = c.checkBitmapEntries(entries)
	}
	if err != nil {
		res.Corruptions++
		return errCheckInvalid
	}
	for _, bm := range entries {
		n := uint64(bm.TableSize) * 8
		if err := c.incRefcounts(res, a, bm.TableOffset, n); err != nil {
			return err
		}
		// TableSize is bounded by checkBitmapEntries (8 MiB of table).
		table := make([]byte, n)
		if err := c.readAt(table, bm.TableOffset); err != nil {
			res.Corruptions++
			return asErrno(err)
		}
		for i := uint64(0); i < n; i += 8 {
			if !c.bitmapTableEntryOK(binary.BigEndian.Uint64(table[i:])) {
				// bitmap_table_load refuses the whole table.
				res.Corruptions++
				return errCheckInvalid
			}
		}
		for i := uint64(0); i < n; i += 8 {
			off := binary.BigEndian.Uint64(table[i:]) & bmeTableOffsetMask
			if off == 0 {
				continue
			}
			if err := c.incRefcounts(res, a, off, uint64(c.l.ClusterSize)); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkBitmapEntries applies the constraints QEMU 7.2's check_dir_entry
// adds to what ReadBitmapDirectory validates.
// and the directory layout bitmap_list_load insists on: entries that
// fill the directory exactly, no extra data, no flags beyond in-use and
// auto.
func (c *checker) checkBitmapEntries(entries []BitmapEntry) error {
	size := uint64(0)
	for _, e := range entries {
		phys := uint64(e.TableSize) * uint64(c.l.ClusterSize)
		bad := e.TableSize == 0 || e.TableOffset == 0 || c.offsetIntoCluster(e.TableOffset) != 0 ||
			e.TableSize > bmeMaxTableSize || len(e.Extra) != 0 || phys > bmeMaxPhysSize ||
			e.Flags&^uint32(BitmapInUse|BitmapAuto) != 0 ||
			(e.Flags&BitmapInUse == 0 && c.h.Size > (phys*8)<<e.GranularityBits)
		if bad {
			return fmt.Errorf("Bitmap '%s' doesn't satisfy the constraints: %w", e.Name, formats.ErrCorrupt)
		}
		size += (bitmapEntryLen + uint64(len(e.Name)) + 7) &^ 7
	}
	if size != c.h.Bitmaps.DirectorySize {
		return fmt.Errorf("Broken bitmap directory: %w", formats.ErrCorrupt)
	}
	return nil
}

// bitmapTableEntryOK is check_table_entry.
func (c *checker) bitmapTableEntryOK(e uint64) bool {
	if e&bmeTableReservedMask != 0 {
		return false
	}
	if off := e & bmeTableOffsetMask; off != 0 {
		return e&bmeTableAllOnes == 0 && c.offsetIntoCluster(off) == 0
	}
	return true
}

// compareRefcounts is compare_refcounts: compare the refcounts on disk
// with the computed ones, fixing what fix allows. highest is the last
// cluster in use by either.
func (c *checker) compareRefcounts(res *formats.CheckResult, a *refcountArray, fix fixFlags, rebuild *bool) (highest int64, err error) {
	for i := int64(0); i < a.n; i++ {
		if i&0xffff == 0 {
			if err := c.ctx.Err(); err != nil {
				return 0, err
			}
		}
		r1, err := c.diskRefcount(i)
		if err != nil {
			c.printf("Can't get refcount for cluster %d: %s", i, strerror(err))
			res.CheckErrors++
			continue
		}
		r2 := a.get(i)
		if r1 > 0 || r2 > 0 {
			highest = i
		}
		if r1 == r2 {
			continue
		}
		var fixed *int64
		switch {
		case r1 == 0:
			*rebuild = true
		case r1 > r2 && fix&fixLeaks != 0:
			fixed = &res.LeaksFixed
		case r1 < r2 && fix&fixErrors != 0:
			fixed = &res.CorruptionsFixed
		}
		what := "Leaked"
		switch {
		case fixed != nil:
			what = "Repairing"
		case r1 < r2:
			what = "ERROR"
		}
		c.printf("%s cluster %d refcount=%d reference=%d", what, i, r1, r2)
		if fixed != nil {
			var uerr error
			if r1 > r2 {
				uerr = c.updateRefcount(i, r1-r2, true)
			} else {
				uerr = c.updateRefcount(i, r2-r1, false)
			}
			if uerr == nil {
				*fixed++
				continue
			}
		}
		if r1 < r2 {
			res.Corruptions++
		} else {
			res.Leaks++
		}
	}
	return highest, nil
}

// allocIMRT is alloc_clusters_imrt: find count free clusters in the
// in-memory table from *firstFree on (growing the table at its end when
// needed), mark them used and return the offset of the first.
func (c *checker) allocIMRT(a *refcountArray, count int64, firstFree *int64) (int64, error) {
	cluster := *firstFree
	firstGap := true
	contiguous := int64(0)
	for ; cluster < a.n && contiguous < count; cluster++ {
		if a.get(cluster) == 0 {
			contiguous++
			if firstGap {
				*firstFree = cluster
				firstGap = false
			}
		} else if contiguous != 0 {
			contiguous = 0
		}
	}
	if contiguous < count {
		if err := a.resize(cluster + count - contiguous); err != nil {
			return 0, err
		}
	}
	cluster -= contiguous
	for i := int64(0); i < count; i++ {
		a.set(cluster+i, 1)
	}
	return cluster << c.l.ClusterBits, nil
}

// writeRefblocks is rebuild_refcounts_write_refblocks: write a refcount
// block (a slice of the in-memory table) for every block of clusters in
// [first, end) that has a used cluster, allocating the blocks in the
// in-memory table. It reports whether the new reftable had to grow.
func (c *checker) writeRefblocks(a *refcountArray, first, end int64, reftable *[]uint64) (bool, error) {
	grown := false
	firstFree := int64(0)
	for cluster := first; cluster < end; cluster++ {
		if a.get(cluster) == 0 {
			continue
		}
		idx := cluster >> c.l.RefblockBits
		start := idx << c.l.RefblockBits
		var off int64
		if int64(len(*reftable)) > idx && (*reftable)[idx] != 0 {
			off = int64((*reftable)[idx])
		} else {
			firstFree = max(firstFree, start)
			var err error
			if off, err = c.allocIMRT(a, 1, &firstFree); err != nil {
				return false, rebuildError("ERROR allocating refblock", err)
			}
			if ci := off >> c.l.ClusterBits; ci >= end {
				// The block holding this block's refcount must be
				// written too.
				end = ci + 1
			}
			if int64(len(*reftable)) <= idx {
				n := ((idx+1)*8 + c.l.ClusterSize - 1) / c.l.ClusterSize * c.l.ClusterSize / 8
				*reftable = append(*reftable, make([]uint64, n-int64(len(*reftable)))...)
				grown = true
			}
			(*reftable)[idx] = uint64(off)
		}
		if err := c.preWriteOverlapCheck(0, uint64(off), uint64(c.l.ClusterSize)); err != nil {
			return false, rebuildError("ERROR writing refblock", err)
		}
		if err := c.writeAt(a.buf[idx*c.l.ClusterSize:(idx+1)*c.l.ClusterSize], uint64(off)); err != nil {
			return false, rebuildError("ERROR writing refblock", err)
		}
		cluster = start + c.l.RefblockEntries - 1
	}
	return grown, nil
}

// rebuildError is a failure of the rebuild as QEMU's error_setg_errno
// words it; it unwraps to the errno that fails the check.
func rebuildError(msg string, err error) error {
	return &qerr{msg: msg + ": " + strerror(err), kind: asErrno(err)}
}

// rebuildRefcountStructure is rebuild_refcount_structure: write a new
// refcount structure from the in-memory table alone and switch the
// header to it. The old structure is left behind as leaked clusters.
func (c *checker) rebuildRefcountStructure(res *formats.CheckResult, a *refcountArray) error {
	// qcow2_cache_empty: changed blocks are written, all are forgotten.
	if err := c.flushRefblocks(); err != nil {
		res.CheckErrors++
		return rebuildError("ERROR writing refblock", err)
	}
	var reftable []uint64
	if _, err := c.writeRefblocks(a, 0, a.n, &reftable); err != nil {
		res.CheckErrors++
		return err
	}
	// Placing the reftable changes the in-memory table, so the blocks
	// covering it are written again; that can grow the reftable, which
	// then needs a new place, until it stops growing.
	var rtOff, rtClusters int64
	for {
		firstFree := int64(0)
		rtClusters = c.sizeToClusters(int64(len(reftable)) * 8)
		var err error
		if rtOff, err = c.allocIMRT(a, rtClusters, &firstFree); err != nil {
			res.CheckErrors++
			return rebuildError("ERROR allocating reftable", err)
		}
		start := rtOff >> c.l.ClusterBits
		grown, err := c.writeRefblocks(a, start, start+rtClusters, &reftable)
		if err != nil {
			res.CheckErrors++
			return err
		}
		if !grown {
			break
		}
	}
	buf := make([]byte, len(reftable)*8)
	for i, e := range reftable {
		binary.BigEndian.PutUint64(buf[8*i:], e)
	}
	if err := c.preWriteOverlapCheck(0, uint64(rtOff), uint64(len(buf))); err != nil {
		return rebuildError("ERROR writing reftable", err)
	}
	if err := c.writeAt(buf, uint64(rtOff)); err != nil {
		return rebuildError("ERROR writing reftable", err)
	}
	// The blocks and the table must be on disk before the header names
	// them.
	if err := c.f.Sync(); err != nil {
		return rebuildError("ERROR writing reftable", err)
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(rtOff))
	binary.BigEndian.PutUint32(hdr[8:], uint32(rtClusters))
	if err := c.writeAt(hdr[:], 48); err != nil {
		return rebuildError("ERROR setting reftable", err)
	}
	if err := c.f.Sync(); err != nil {
		return rebuildError("ERROR setting reftable", err)
	}
	c.h.RefcountTableOffset = uint64(rtOff)
	c.h.RefcountTableClusters = uint32(rtClusters)
	c.reftable = reftable
	return nil
}

// checkRefcounts is qcow2_check_refcounts.
func (c *checker) checkRefcounts(res *formats.CheckResult) error {
	size, err := c.f.Size()
	if err != nil {
		res.CheckErrors++
		return asErrno(err)
	}
	c.fileLen = size
	nb := c.sizeToClusters(size)
	if nb > math.MaxInt32 {
		res.CheckErrors++
		return errCheckTooLarge
	}
	res.TotalClusters = c.sizeToClusters(int64(c.h.Size &^ 511))

	a := &refcountArray{order: c.l.RefcountOrder, clusterSize: c.l.ClusterSize}
	if err := a.resize(nb); err != nil {
		res.CheckErrors++
		return err
	}
	rebuild := false
	if err := c.calculateRefcounts(res, a, c.fix, &rebuild); err != nil {
		return err
	}
	// When only a fix is needed, the comparison runs again with fixing
	// enabled; this first result is then dropped.
	pre := *res
	highest, err := c.compareRefcounts(res, a, 0, &rebuild)
	if err != nil {
		return err
	}
	switch {
	case rebuild && c.fix&fixErrors != 0:
		old := *res
		freshLeaks := int64(0)
		c.printf("Rebuilding refcount structure")
		if err := c.rebuildRefcountStructure(res, a); err != nil {
			c.printf("%s", err)
			return errors.Unwrap(err)
		}
		res.Corruptions, res.Leaks = 0, 0
		// The references changed with the new structure: count again.
		rebuild = false
		clear(a.buf)
		if err := c.calculateRefcounts(res, a, 0, &rebuild); err != nil {
			return err
		}
		if c.fix&fixLeaks != 0 {
			// The old structure is leaked now; fix that. Leaks that
			// remain were made by the rebuild.
			saved := *res
			*res = formats.CheckResult{}
			if highest, err = c.compareRefcounts(res, a, fixLeaks, &rebuild); err != nil {
				return err
			}
			if rebuild {
				c.printf("ERROR rebuilt refcount structure is still broken")
			}
			freshLeaks = res.Leaks
			*res = saved
		}
		if res.Corruptions < old.Corruptions {
			res.CorruptionsFixed += old.Corruptions - res.Corruptions
		}
		if res.Leaks < old.Leaks {
			res.LeaksFixed += old.Leaks - res.Leaks
		}
		res.Leaks += freshLeaks
	case c.fix != 0:
		if rebuild {
			c.printf("ERROR need to rebuild refcount structures")
			res.CheckErrors++
			return errCheckIO
		}
		if res.Leaks != 0 || res.Corruptions != 0 {
			*res = pre
			if highest, err = c.compareRefcounts(res, a, c.fix, &rebuild); err != nil {
				return err
			}
		}
	}
	if err := c.checkOflagCopied(res, c.fix); err != nil {
		return err
	}
	res.ImageEndOffset = (highest + 1) * c.l.ClusterSize
	return nil
}

var _ formats.Checker = (*Image)(nil)

// Check verifies the image's metadata as `qemu-img check` does and, with
// CheckFixLeaks or CheckFixAll, repairs it (qcow2_co_check_locked).
// Per-problem messages, worded as QEMU prints them on stderr, go to
// report one line at a time without the newline. Like QEMU's driver
// callback it runs one pass; qemu-img's second pass after repairs is the
// caller's (a CheckReadOnly call).
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	// No request may use a mapping while the check rewrites metadata.
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.stoppedByCorruption() {
		// QEMU has taken the driver away from the image (bs->drv =
		// NULL); every later request fails with ENOMEDIUM.
		return nil, formats.ErrnoError{Err: syscall.ENOMEDIUM}
	}
	if mode != formats.CheckReadOnly && img.readOnly {
		return nil, formats.ErrReadOnly
	}
	return img.checkLocked(ctx, fixFor(mode), report)
}

// stoppedByCorruption reports whether a fatal corruption event made the
// image unusable: an image whose file is writable became read-only, which
// only markCorrupt and the check's fatal corruption do.
func (img *Image) stoppedByCorruption() bool {
	return img.readOnly && !img.file.ReadOnly()
}

// repairDirty repairs an image left dirty by lazy refcounts, as QEMU's
// read-write open does: a full check with every fix. img.mu is held.
func (img *Image) repairDirty() error {
	res, err := img.checkLocked(context.Background(), fixLeaks|fixErrors, img.warn)
	if err != nil {
		return err
	}
	if res.CheckErrors != 0 {
		return errCheckIO
	}
	return nil
}

// checkLocked is qcow2_co_check_locked. img.mu is held.
func (img *Image) checkLocked(ctx context.Context, fix fixFlags, report func(string)) (res *formats.CheckResult, err error) {
	if !img.readOnly {
		// The check reads tables from the file: cached changes first.
		if err := img.flushCaches(); err != nil {
			return nil, err
		}
	}
	c := &checker{
		ctx:       ctx,
		f:         img.file,
		h:         *img.hdr,
		l:         img.lay,
		fix:       fix,
		report:    report,
		writable:  !img.readOnly,
		l1:        append([]uint64(nil), img.l1...),
		reftable:  append([]uint64(nil), img.reftable...),
		snapshots: img.snapshots,
	}
	if n := len(c.snapshots); n > 0 {
		last := c.snapshots[n-1]
		end := last.Offset + snapshotHeaderLen + uint64(len(last.Extra)) + uint64(len(last.ID)) + uint64(len(last.Name))
		c.snapshotsSize = int64(end - c.h.SnapshotsOffset)
	}
	if !img.readOnly {
		// Whatever the outcome, the tables the driver cached may be
		// stale after repairs or a corruption event.
		defer func() {
			if aerr := img.adoptCheckState(c); aerr != nil && err == nil {
				res, err = nil, aerr
			}
		}()
	}

	result := &formats.CheckResult{}
	var snapRes formats.CheckResult
	c.checkSnapshotTable(&snapRes)
	if err := c.checkRefcounts(result); err != nil {
		return nil, err
	}
	if snapRes.Corruptions != 0 && fix&fixErrors != 0 {
		// qcow2_check_fix_snapshot_table: with the refcounts now
		// sound, the table is written anew with complete entries.
		if err := img.adoptCheckState(c); err != nil {
			return nil, err
		}
		if err := img.writeSnapshotTable(img.snapshots, c.snapshotsSize); err != nil {
			c.printf("ERROR failed to update snapshot table: %s", strerror(err))
			return nil, asErrno(err)
		}
		snapRes.CorruptionsFixed += snapRes.Corruptions
		snapRes.Corruptions = 0
	}
	addCheckResult(result, &snapRes)
	if fix != 0 && result.CheckErrors == 0 && result.Corruptions == 0 {
		if err := img.adoptCheckState(c); err != nil {
			return nil, err
		}
		if err := img.markCleanAndConsistent(); err != nil {
			return nil, err
		}
	}
	return result, nil
}

// addCheckResult is qcow2_add_check_result without the allocation
// figures, which only the refcount check provides.
func addCheckResult(out, src *formats.CheckResult) {
	out.Corruptions += src.Corruptions
	out.Leaks += src.Leaks
	out.CheckErrors += src.CheckErrors
	out.CorruptionsFixed += src.CorruptionsFixed
	out.LeaksFixed += src.LeaksFixed
}

// checkSnapshotTable is the part of qcow2_check_read_snapshot_table that
// applies to a table the driver could read: every version 3 entry needs
// at least 16 bytes of extra data.
func (c *checker) checkSnapshotTable(res *formats.CheckResult) {
	if c.h.Version < 3 {
		return
	}
	for i, sn := range c.snapshots {
		if len(sn.Extra) < 16 {
			res.Corruptions++
			c.printf("%s snapshot table entry %d is incomplete", repairing(c.fix&fixErrors != 0), i)
		}
	}
}

// markCleanAndConsistent is qcow2_mark_clean plus qcow2_mark_consistent
// after a successful repair: the dirty and corrupt bits are cleared with a
// header rewrite.
func (img *Image) markCleanAndConsistent() error {
	if img.hdr.IncompatibleFeatures&(IncompatDirty|IncompatCorrupt) == 0 {
		return nil
	}
	// The refcounts must be on disk before the dirty bit goes.
	if err := img.flushCaches(); err != nil {
		return err
	}
	img.hdr.IncompatibleFeatures &^= IncompatDirty | IncompatCorrupt
	img.dirtyBitSet = false
	return img.writeHeader()
}

// adoptCheckState hands the repaired state to the driver: the check's
// changed refcount blocks are written (unless a fatal corruption stopped
// the image: QEMU then never flushes its cache), and the driver takes the
// (possibly new) refcount table, the L1 table with repaired flags and the
// header bits, dropping cached tables that may predate the repairs.
func (img *Image) adoptCheckState(c *checker) error {
	if c.adopted {
		return nil
	}
	c.adopted = true
	var err error
	if !c.fatal {
		err = c.flushRefblocks()
	}
	img.hdr.RefcountTableOffset = c.h.RefcountTableOffset
	img.hdr.RefcountTableClusters = c.h.RefcountTableClusters
	img.hdr.IncompatibleFeatures = c.h.IncompatibleFeatures
	img.reftable = c.reftable
	img.l1 = c.l1
	img.tablesChanged()
	img.newCaches()
	img.freeHint = 0
	img.freeBytePos = 0
	if c.fatal {
		img.readOnly = true
	}
	return err
}
