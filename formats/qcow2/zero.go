package qcow2

import (
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// zeroChunk bounds the buffer used to write explicit zeroes.
const zeroChunk = 1 << 20

// WriteZeroes makes [off, off+length) read as zeroes. Version 3 images
// mark whole (sub)clusters with the zero flag, deallocating them when
// mayUnmap; parts of clusters get real zeroes unless the rest of the
// cluster already reads as zeroes. Version 2 images have no zero flag:
// without a backing file whole clusters are deallocated (as QEMU falls
// back to discard), with one everything is written with zeroes.
//
// It holds freeMu exclusively: even without mayUnmap, compressed
// clusters are freed.
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	end := off + length
	img.mu.Lock()
	size := img.size
	v3 := img.hdr.Version >= 3
	unit := img.lay.SubclusterSize
	if !v3 {
		unit = img.lay.ClusterSize
	}
	// Widen to whole units where the rest of the unit reads as zeroes
	// (QEMU's is_zero check), so a zero write never allocates.
	start := off
	if head := off &^ (unit - 1); head != off {
		z, err := img.readsZero(head, off-head)
		if err != nil {
			img.mu.Unlock()
			return err
		}
		if z {
			start = head
		}
	}
	stop := end
	if tail := min((end+unit-1)&^(unit-1), size); tail != end {
		z, err := img.readsZero(end, tail-end)
		if err != nil {
			img.mu.Unlock()
			return err
		}
		if z {
			stop = tail
		}
	}
	img.mu.Unlock()
	// Whole units inside [start, stop); the unit holding the end of an
	// image whose size is not aligned counts as whole.
	alignedStart := (start + unit - 1) &^ (unit - 1)
	alignedEnd := stop &^ (unit - 1)
	if stop == size {
		alignedEnd = stop
	}
	if alignedStart >= alignedEnd || (!v3 && img.hdr.BackingFile != "") {
		return img.writeZeroBytes(off, end)
	}
	if err := img.writeZeroBytes(off, max(off, alignedStart)); err != nil {
		return err
	}
	img.mu.Lock()
	var err error
	if v3 {
		err = img.zeroize(alignedStart, alignedEnd, mayUnmap)
	} else {
		err = img.discardClusters(alignedStart, alignedEnd)
	}
	img.mu.Unlock()
	if err != nil {
		return err
	}
	return img.writeZeroBytes(min(end, alignedEnd), end)
}

// writeZeroBytes writes real zeroes to [off, end). freeMu is held
// exclusively.
func (img *Image) writeZeroBytes(off, end int64) error {
	if off >= end {
		return nil
	}
	zero := make([]byte, min(end-off, zeroChunk))
	for off < end {
		n := min(end-off, int64(len(zero)))
		for done := int64(0); done < n; {
			w, err := img.writeStep(zero[done:n], off+done, true)
			if err != nil {
				return err
			}
			done += w
		}
		off += n
	}
	return nil
}

// readsZero reports whether [off, off+n) reads as zeroes, from metadata
// alone. img.mu is held.
func (img *Image) readsZero(off, n int64) (bool, error) {
	for n > 0 {
		m, err := img.lookup(off, n)
		if err != nil {
			return false, err
		}
		switch m.typ {
		case ZeroPlain, ZeroAlloc:
		case Unallocated, UnallocatedAlloc:
			if img.backing != nil && off < img.backing.Size() {
				ok, err := chainReadsZero(img.backing, off, min(m.length, img.backing.Size()-off))
				if err != nil || !ok {
					return false, err
				}
			}
		default:
			return false, nil
		}
		off, n = off+m.length, n-m.length
	}
	return true, nil
}

// chainReadsZero asks a backing chain whether a range reads as zeroes.
func chainReadsZero(img formats.Image, off, n int64) (bool, error) {
	for n > 0 {
		e, err := formats.ChainStatus(img, off, n)
		if err != nil {
			return false, err
		}
		if e.Status&formats.StatusZero == 0 || e.Length <= 0 {
			return false, nil
		}
		off, n = off+e.Length, n-e.Length
	}
	return true, nil
}

// zeroize marks [start, end) zero in the L2 tables (v3). start and end
// are unit aligned (end may be the unaligned image end). Whole clusters
// are deallocated when unmap (and always when compressed); subclusters
// of a partly covered cluster get their zero bits. img.mu is held.
func (img *Image) zeroize(start, end int64, unmap bool) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	if err := img.zeroRawDataFile(start, end); err != nil {
		return err
	}
	lay := &img.lay
	cs := lay.ClusterSize
	for pos := start; pos < end; {
		cstart := pos &^ (cs - 1)
		cend := min(cstart+cs, end)
		whole := pos == cstart && (cend == cstart+cs || cend == img.size)
		t, err := img.writableL2(lay.L1Index(pos))
		if err != nil {
			return err
		}
		i := lay.L2Index(pos)
		old := lay.ReadL2Entry(t.data, i)
		ct := lay.ClusterType(old)
		newE := old
		free := false
		switch {
		case whole:
			free = ct == Compressed || unmap && (ct == Normal || ct == ZeroAlloc)
			if free {
				newE = L2Entry{}
			}
			if lay.ExtendedL2 {
				newE.Bitmap = 0xffffffff << 32
			} else {
				newE.Raw |= OflagZero
			}
		case ct == Compressed:
			// A compressed cluster cannot be partly zero.
			img.mu.Unlock()
			err := img.writeZeroBytes(pos, cend)
			img.mu.Lock()
			if err != nil {
				return err
			}
			pos = cend
			continue
		default:
			scs := lay.SubclusterSize
			bits := uint64(1)<<((cend-cstart+scs-1)/scs) - uint64(1)<<((pos-cstart)/scs)
			newE.Bitmap = (old.Bitmap | bits<<32) &^ bits
		}
		if newE != old {
			lay.WriteL2Entry(t.data, i, newE)
			t.dirty = true
			if free {
				if err := img.freeEntry(old, img.runtime.passDiscardRequest()); err != nil {
					return err
				}
			}
		}
		pos = cend
	}
	return nil
}

// Discard drops whole clusters in [off, off+length) (the last cluster of
// an image with an unaligned size counts when the range reaches the
// end): they read as zeroes afterwards. Partial clusters are left alone,
// as QEMU does, and so is everything in version 2 images with a backing
// file, where a dropped cluster would expose stale backing data.
func (img *Image) Discard(off, length int64) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hdr.Version < 3 && img.hdr.BackingFile != "" {
		return nil
	}
	cs := img.lay.ClusterSize
	start := (off + cs - 1) &^ (cs - 1)
	end := (off + length) &^ (cs - 1)
	if off+length == img.size {
		end = off + length
	}
	if start >= end {
		return nil
	}
	return img.discardClusters(start, end)
}

// discardClusters is qcow2_cluster_discard without full_discard for the
// clusters in [start, end): allocated clusters become zero clusters (v3)
// or unallocated (v2), unallocated ones become zero clusters when a
// backing file would otherwise show through (v3). Freed host clusters
// are punched. img.mu is held.
func (img *Image) discardClusters(start, end int64) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	if err := img.zeroRawDataFile(start, end); err != nil {
		return err
	}
	lay := &img.lay
	for pos := start; pos < end; pos += lay.ClusterSize {
		// QEMU allocates missing L2 tables here even when nothing
		// changes; so does this, to keep the same layout.
		t, err := img.writableL2(lay.L1Index(pos))
		if err != nil {
			return err
		}
		i := lay.L2Index(pos)
		old := lay.ReadL2Entry(t.data, i)
		ct := lay.ClusterType(old)
		newE := old
		if img.backing != nil || ct == Normal || ct == ZeroAlloc || ct == Compressed {
			switch {
			case lay.ExtendedL2:
				newE = L2Entry{Bitmap: 0xffffffff << 32}
			case img.hdr.Version >= 3:
				newE = L2Entry{Raw: OflagZero}
			default:
				newE = L2Entry{}
			}
		}
		if newE == old {
			continue
		}
		lay.WriteL2Entry(t.data, i, newE)
		t.dirty = true
		if err := img.freeEntry(old, img.runtime.passDiscardRequest()); err != nil {
			return err
		}
	}
	return nil
}

// zeroRawDataFile keeps a raw external data file a valid raw image:
// ranges that become zero in the L2 tables are zeroed there too, as
// QEMU does for data_file_raw.
func (img *Image) zeroRawDataFile(start, end int64) error {
	if img.hdr.AutoclearFeatures&AutoclearDataFileRaw == 0 || start >= end {
		return nil
	}
	if err := img.data.PunchHole(start, end-start); err != nil {
		return fmt.Errorf("%s: zeroing %d bytes at %#x: %w", img.data.Name(), end-start, start, err)
	}
	return nil
}
