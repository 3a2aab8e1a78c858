package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// Resize changes the virtual size as qcow2_co_truncate does. Growing
// extends the L1 table and preallocates per prealloc (off, metadata,
// falloc, full); shrinking drops every cluster past the new end, the L2
// tables no longer needed, and the unused tail of the file.
func (img *Image) Resize(size int64, prealloc string, shrink bool) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	switch prealloc {
	case "":
		prealloc = "off"
	case "off", "metadata", "falloc", "full":
	default:
		return errorf(formats.ErrInvalidOption, "Unsupported preallocation mode '%s'", prealloc)
	}
	if size < 0 || size&511 != 0 {
		return errorf(formats.ErrInvalidOption, "The new size must be a multiple of 512")
	}
	if len(img.snapshots) > 0 && img.hdr.Version < 3 {
		return errorf(formats.ErrUnsupported, "Can't resize a v2 image which has snapshots")
	}
	for _, b := range img.bitmaps {
		if b.Flags&BitmapInUse != 0 && !img.isTracked(b.Name) {
			return errorf(formats.ErrUnsupported, "Bitmap '%s' is currently in use by another operation", b.Name)
		}
	}
	// A bitmap is held in memory whole and must fit QEMU's limit to be
	// stored (BME_MAX_PHYS_SIZE): growing past what it can cover is
	// refused before anything changes. (QEMU runs out of memory.)
	for _, b := range img.bitmaps {
		if size > img.size && bitmapBytes(size, b.GranularityBits) > bitmapMaxPhysSize {
			return errorf(formats.ErrInvalidOption,
				"Bitmap '%s' cannot cover %d bytes: too much space would be occupied by the bitmap", b.Name, size)
		}
	}
	if err := img.markBitmapsInUse(); err != nil {
		return err
	}
	old := img.size
	newL1 := img.lay.L1SizeFor(size)
	if size < old {
		if !shrink {
			return errorf(formats.ErrInvalidOption, "Use the --shrink option to perform a shrink operation.")
		}
		if prealloc != "off" {
			return errorf(formats.ErrInvalidOption, "Preallocation can't be used for shrinking an image")
		}
		if err := img.shrink(size, newL1); err != nil {
			return err
		}
	} else if newL1 > int64(len(img.l1)) {
		if err := img.growL1(newL1); err != nil {
			return fmt.Errorf("Failed to grow the L1 table: %w", err)
		}
	}
	if size > old {
		var err error
		switch {
		case prealloc == "metadata" || (prealloc != "off" && img.lay.HasDataFile):
			err = img.preallocateMetadata(old, size)
		case prealloc == "falloc" || prealloc == "full":
			err = img.preallocateData(old, size, prealloc)
		}
		if err != nil {
			return err
		}
	}
	if img.lay.HasDataFile {
		if err := img.data.Truncate(size); err != nil {
			return err
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(size))
	if err := img.writeSync(b[:], 24); err != nil {
		return err
	}
	img.size = size
	img.hdr.Size = uint64(size)
	return nil
}

// growL1 moves the L1 table to a new place with n entries
// (qcow2_grow_l1_table with exact size): the new table is written and
// synced before the header points to it, and the old one is freed after.
func (img *Image) growL1(n int64) error {
	if n*8 > maxL1Bytes {
		return fmt.Errorf("File too large: %w", formats.ErrUnsupported)
	}
	table := make([]uint64, n)
	copy(table, img.l1)
	clusters := (n*8 + img.lay.ClusterSize - 1) >> img.lay.ClusterBits
	off, err := img.allocClusters(clusters)
	if err != nil {
		return err
	}
	if err := img.flushRefcounts(); err != nil {
		return err
	}
	buf := make([]byte, n*8)
	for i, e := range table {
		binary.BigEndian.PutUint64(buf[8*i:], e)
	}
	if err := img.writeSync(buf, off); err != nil {
		return err
	}
	var h [12]byte
	binary.BigEndian.PutUint32(h[0:], uint32(n))
	binary.BigEndian.PutUint64(h[4:], off)
	if err := img.writeSync(h[:], 36); err != nil {
		return err
	}
	oldOff, oldN := img.hdr.L1TableOffset, int64(len(img.l1))
	img.l1 = table
	img.tablesChanged()
	img.hdr.L1TableOffset, img.hdr.L1Size = off, uint32(n)
	if oldN > 0 {
		c := (oldN*8 + img.lay.ClusterSize - 1) >> img.lay.ClusterBits
		return img.updateRefcounts(int64(oldOff>>img.lay.ClusterBits), c, -1)
	}
	return nil
}

// shrink drops the clusters past size, the L2 tables past newL1 entries,
// and the file's unused tail. The L1 table keeps its size, as in QEMU.
func (img *Image) shrink(size, newL1 int64) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	lay := &img.lay
	cs := lay.ClusterSize
	if err := img.fullDiscard((size+cs-1)&^(cs-1), img.size, true); err != nil {
		return err
	}
	if err := img.flushL2(); err != nil {
		return err
	}
	for i := newL1; i < int64(len(img.l1)); i++ {
		l2off, err := img.l2Offset(i)
		if err != nil {
			return err
		}
		if l2off == 0 {
			continue
		}
		if err := img.setL1(i, 0); err != nil {
			return err
		}
		img.l2Cache.drop(l2off)
		if err := img.freeClusters(int64(l2off>>lay.ClusterBits), 1, true); err != nil {
			return err
		}
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	return img.truncateTail()
}

// fullDiscard drops every cluster in [start, end) (cluster aligned) so
// that it is unallocated, reading from the backing file again
// (qcow2_cluster_discard with full_discard). With allocTables it
// allocates missing L2 tables on the way as QEMU's discard does (for an
// identical layout); otherwise it skips them. img.mu is held.
func (img *Image) fullDiscard(start, end int64, allocTables bool) error {
	lay := &img.lay
	for pos := start; pos < end; pos += lay.ClusterSize {
		l1i := lay.L1Index(pos)
		if !allocTables {
			l2off, err := img.l2Offset(l1i)
			if err != nil {
				return err
			}
			if l2off == 0 {
				pos = (l1i+1)*lay.L1Coverage() - lay.ClusterSize
				continue
			}
		}
		t, err := img.writableL2(l1i)
		if err != nil {
			return err
		}
		i := lay.L2Index(pos)
		old := lay.ReadL2Entry(t.data, i)
		if old == (L2Entry{}) {
			continue
		}
		lay.WriteL2Entry(t.data, i, L2Entry{})
		t.dirty = true
		if err := img.freeEntry(old, true); err != nil {
			return err
		}
	}
	return nil
}

// truncateTail cuts the file after the last cluster in use.
func (img *Image) truncateTail() error {
	fsize, err := img.file.Size()
	if err != nil {
		return err
	}
	last := int64(-1)
	for c := (fsize+img.lay.ClusterSize-1)>>img.lay.ClusterBits - 1; c >= 0; c-- {
		rc, err := img.Refcount(c)
		if err != nil {
			return err
		}
		if rc != 0 {
			last = c
			break
		}
	}
	if end := (last + 1) << img.lay.ClusterBits; end < fsize {
		// Not fatal in QEMU either ("Failed to truncate the tail").
		if err := img.file.Truncate(end); err != nil {
			img.warnf("Failed to truncate the tail of the image: %v", err)
		}
	}
	return nil
}

// preallocateMetadata allocates every cluster of [from, to) that has no
// host cluster (QEMU's preallocate_co): per L2 table, the table first,
// then one contiguous run of data clusters. With extended L2 the
// subclusters stay unallocated, so reads still see the backing file.
// The file is then extended (sparsely) to cover the last cluster.
func (img *Image) preallocateMetadata(from, to int64) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	lay := &img.lay
	cs := lay.ClusterSize
	var fileEnd int64
	for pos := from &^ (cs - 1); pos < to; {
		l1i := lay.L1Index(pos)
		t, err := img.writableL2(l1i)
		if err != nil {
			return err
		}
		tableEnd := min(to, (l1i+1)*lay.L1Coverage())
		var todo []int64
		for p := pos; p < tableEnd; p += cs {
			e := lay.ReadL2Entry(t.data, lay.L2Index(p))
			if ct := lay.ClusterType(e); ct != Normal && ct != ZeroAlloc || !e.Copied() && !lay.HasDataFile {
				todo = append(todo, p)
			}
		}
		if len(todo) > 0 {
			var host uint64
			if !lay.HasDataFile {
				if host, err = img.allocClusters(int64(len(todo))); err != nil {
					return err
				}
				if err := img.l2DependsOnRefcounts(); err != nil {
					return err
				}
			}
			for _, p := range todo {
				i := lay.L2Index(p)
				old := lay.ReadL2Entry(t.data, i)
				h := host
				if lay.HasDataFile {
					h = uint64(p)
				} else {
					host += uint64(cs)
				}
				newE := L2Entry{Raw: h | OflagCopied}
				if lay.ExtendedL2 {
					newE.Bitmap = old.Bitmap & (0xffffffff << 32)
				}
				lay.WriteL2Entry(t.data, i, newE)
				t.dirty = true
				if err := img.freeEntry(old, false); err != nil {
					return err
				}
				fileEnd = int64(h) + min(cs, to-p)
			}
		}
		pos = tableEnd
	}
	f := img.file
	if lay.HasDataFile {
		f = img.data
	}
	fsize, err := f.Size()
	if err != nil {
		return err
	}
	if fileEnd > fsize {
		return f.Truncate(fileEnd)
	}
	return nil
}

// preallocateData is qcow2_co_truncate's falloc/full path: a new
// refcount table and blocks are placed after the last used cluster,
// sized for the data to come; the data clusters follow in one
// contiguous run that the file is grown over (with fallocate, or with
// written zeroes for full); then the L2 entries are linked, their tables
// taking the first free clusters.
func (img *Image) preallocateData(from, to int64, mode string) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	lay := &img.lay
	cs := lay.ClusterSize
	first := from &^ (cs - 1)
	if first != from {
		// The partial cluster at the old end keeps its storage.
		first += cs
	}
	n := ((to+cs-1)&^(cs-1) - first) / cs
	if n <= 0 {
		return nil
	}
	fsize, err := img.file.Size()
	if err != nil {
		return err
	}
	last := int64(-1)
	for c := (fsize+cs-1)/cs - 1; c >= 0; c-- {
		rc, err := img.Refcount(c)
		if err != nil {
			return err
		}
		if rc != 0 {
			last = c
			break
		}
	}
	// As QEMU: the new refcount structures also cover the L2 tables
	// that may be needed, plus one for an unaligned head or tail.
	l2Tables := (n+lay.L2Entries-1)/lay.L2Entries + 1
	dataStart, err := img.refcountArea(last+1, n+l2Tables, true, 0, 0)
	if err != nil {
		return err
	}
	// Refcounts for the data run; its blocks exist now.
	if err := img.updateRefcounts(dataStart, n, 1); err != nil {
		return err
	}
	img.freeHint = 0
	if err := img.flushRefcounts(); err != nil {
		return err
	}
	dataOff := dataStart * cs
	cur, err := img.file.Size()
	if err != nil {
		return err
	}
	end := dataOff + n*cs
	if end > cur {
		if mode == "falloc" {
			if err := img.file.Allocate(cur, end-cur); err != nil {
				return fmt.Errorf("Could not preallocate data for the new area: %w", formats.ErrnoError{Err: err})
			}
		} else if err := img.writeZeroRange(cur, end); err != nil {
			return err
		}
	}
	for i := int64(0); i < n; i++ {
		g := first + i*cs
		t, err := img.writableL2(lay.L1Index(g))
		if err != nil {
			return err
		}
		if err := img.l2DependsOnRefcounts(); err != nil {
			return err
		}
		j := lay.L2Index(g)
		old := lay.ReadL2Entry(t.data, j)
		newE := L2Entry{Raw: uint64(dataOff+i*cs) | OflagCopied}
		if lay.ExtendedL2 {
			newE.Bitmap = 0xffffffff
		}
		lay.WriteL2Entry(t.data, j, newE)
		t.dirty = true
		if err := img.freeEntry(old, false); err != nil {
			return err
		}
	}
	return nil
}

// writeZeroRange writes zeroes to the image file over [off, end).
func (img *Image) writeZeroRange(off, end int64) error {
	zero := make([]byte, min(end-off, zeroChunk))
	for off < end {
		n := min(end-off, int64(len(zero)))
		if _, err := img.file.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}
