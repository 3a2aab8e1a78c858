package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// Changing the refcount width (amend -o refcount_bits=N) follows QEMU's
// qcow2_change_refcount_order: the new refcount blocks and table are
// allocated inside the old structure (repeating until an allocation
// pass needs nothing more, since allocations change refcounts), then
// filled from the old refcounts and written, then the header switches
// to them in one write, and finally the old blocks and table are freed
// through the new structure. A crash before the header write leaks the
// new clusters; after it, the old ones.

// refblockOp is called for every new refcount block a walk completes:
// idx is its index in the new table, block its contents (nil when the
// walk only counts) and empty whether every refcount in it is 0.
type refblockOp func(idx int64, block []byte, empty bool) error

// walkRefcounts is walk_over_reftable: it reads every refcount of the
// old structure in order and packs them into new refcount blocks of
// newOrder, calling op for each.
//
// Progress is reported per old refcount table entry, walk index of
// total walks, as QEMU does.
func (img *Image) walkRefcounts(newOrder uint32, fill bool, op refblockOp, index, total int64, progress func(done, total int64)) error {
	lay := &img.lay
	newEntries := int64(8*lay.ClusterSize) >> newOrder
	var block []byte
	if fill {
		block = make([]byte, lay.ClusterSize)
	}
	idx, n, empty := int64(0), int64(0), true
	emit := func() error {
		if err := op(idx, block, empty); err != nil {
			return err
		}
		idx, n, empty = idx+1, 0, true
		if block != nil {
			clear(block)
		}
		return nil
	}
	size := int64(len(img.reftable))
	for rt := int64(0); rt < size; rt++ {
		progress(index*size+rt, total*size)
		b, err := img.refblockAt(rt)
		if err != nil {
			return err
		}
		if b == nil {
			// No block: its clusters all count 0, which the new blocks
			// (zeroed after each emit) already say; only the block
			// boundaries matter. The table is mostly such entries.
			for left := lay.RefblockEntries; left > 0; {
				if n >= newEntries {
					if err := emit(); err != nil {
						return err
					}
				}
				step := min(left, newEntries-n)
				n += step
				left -= step
			}
			continue
		}
		for i := int64(0); i < lay.RefblockEntries; i++ {
			if n >= newEntries {
				if err := emit(); err != nil {
					return err
				}
			}
			rc := GetRefcount(b.data, i, lay.RefcountOrder)
			if newOrder < 6 && rc>>(uint64(1)<<newOrder) != 0 {
				off := (rt<<lay.RefblockBits + i) << lay.ClusterBits
				return errorf(formats.ErrInvalidOption, "Cannot decrease refcount entry width to %d bits: Cluster at offset %#x has a refcount of %d", 1<<newOrder, off, rc)
			}
			if block != nil {
				SetRefcount(block, n, newOrder, rc)
			}
			n++
			empty = empty && rc == 0
		}
	}
	if n > 0 {
		if err := emit(); err != nil {
			return err
		}
	}
	progress((index+1)*size, total*size)
	return nil
}

// changeRefcountOrder is qcow2_change_refcount_order. img.mu is held.
func (img *Image) changeRefcountOrder(newOrder uint32, progress func(done, total int64)) error {
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	cs := img.lay.ClusterSize
	var table []uint64
	var tableOff uint64
	var tableAllocated int64 // entries the allocated table has room for
	walk := int64(0)
	for {
		allocated := false
		err := img.walkRefcounts(newOrder, false, func(idx int64, _ []byte, empty bool) error {
			if empty {
				return nil
			}
			if idx >= int64(len(table)) {
				size := (idx + 1 + cs/8 - 1) / (cs / 8) * (cs / 8)
				if size*8 > maxRefcountTableBytes {
					return errorf(formats.ErrUnsupported, "The new reftable is too big")
				}
				table = append(table, make([]uint64, size-int64(len(table)))...)
			}
			if table[idx] == 0 {
				off, err := img.allocClusters(1)
				if err != nil {
					return err
				}
				table[idx] = off
				allocated = true
			}
			return nil
		}, walk, max(walk+2, 3), progress)
		walk++
		if err != nil {
			return err
		}
		if !allocated {
			break
		}
		if tableOff != 0 {
			if err := img.freeClusters(int64(tableOff>>img.lay.ClusterBits), (tableAllocated*8+cs-1)/cs, false); err != nil {
				return err
			}
		}
		off, err := img.allocClusters((int64(len(table))*8 + cs - 1) / cs)
		if err != nil {
			return err
		}
		tableOff, tableAllocated = off, int64(len(table))
	}
	if tableOff == 0 {
		// Nothing is allocated at all; impossible for a valid image,
		// whose header cluster has a refcount.
		return img.corruptf("no refcounts to convert")
	}
	err := img.walkRefcounts(newOrder, true, func(idx int64, block []byte, empty bool) error {
		if idx < int64(len(table)) && table[idx] != 0 {
			if err := img.checkOverlap(table[idx], uint64(cs)); err != nil {
				return err
			}
			_, err := img.file.WriteAt(block, int64(table[idx]))
			return err
		}
		if !empty {
			return img.corruptf("refcount block %d of the new width was not allocated", idx)
		}
		return nil
	}, walk, walk+1, progress)
	if err != nil {
		return err
	}
	raw := make([]byte, len(table)*8)
	for i, e := range table {
		binary.BigEndian.PutUint64(raw[8*i:], e)
	}
	if err := img.checkOverlap(tableOff, uint64(len(raw))); err != nil {
		return err
	}
	if _, err := img.file.WriteAt(raw, int64(tableOff)); err != nil {
		return err
	}
	// The old structure's cached changes (the allocations above) and
	// everything just written reach the disk before the header.
	if err := img.flushCaches(); err != nil {
		return err
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	h := img.hdr
	old := *h
	oldTable, oldOff := img.reftable, h.RefcountTableOffset
	h.RefcountOrder = newOrder
	h.RefcountTableOffset = tableOff
	h.RefcountTableClusters = uint32(int64(len(table)) * 8 / cs)
	if err := img.writeHeader(); err != nil {
		*h = old
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	img.lay = NewLayout(h)
	img.reftable = table
	img.tablesChanged()
	img.newCaches()
	img.freeHint = 0
	for _, e := range oldTable {
		if off := e & OffsetMask; off != 0 {
			if err := img.freeClusters(int64(off>>img.lay.ClusterBits), 1, false); err != nil {
				return err
			}
		}
	}
	return img.freeClusters(int64(oldOff>>img.lay.ClusterBits), (int64(len(oldTable))*8+cs-1)/cs, false)
}
