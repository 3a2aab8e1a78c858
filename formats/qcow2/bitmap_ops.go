package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"

	"github.com/imgfs/imgfs/formats"
)

// Persistent dirty bitmaps (docs/interop/qcow2.txt "Bitmaps extension",
// QEMU's block/qcow2-bitmap.c). A bitmap's data is stored cluster by
// cluster through a bitmap table; entry 0 means an all-zeroes cluster,
// offset 0 with bit 0 set an all-ones cluster.
//
// Updates are crash safe the way QEMU makes them: new bitmap data,
// tables and directory are written to newly allocated clusters whose
// refcounts reach the disk first, then the header's bitmaps extension
// is switched over in one write, and only then are the old clusters
// freed. A crash in between leaks clusters at worst.

// Limits of block/qcow2-bitmap.c.
const (
	bitmapMaxTableSize  = 0x8000000  // BME_MAX_TABLE_SIZE, entries
	bitmapMaxPhysSize   = 0x20000000 // BME_MAX_PHYS_SIZE, bytes of bitmap data
	bitmapTableReserved = 0xff000000000001fe
)

// bitmapState is the in-memory part of the persistent bitmaps. img.mu
// guards it.
type bitmapState struct {
	// bits holds the loaded data of bitmaps by name. A loaded bitmap is
	// rewritten by the next store.
	bits map[string][]byte
	// tracked names the enabled, consistent bitmaps that writes update;
	// they are flagged in use on disk while tracked.
	tracked []string
	// live: tracking started (the first write since open or the last
	// store loaded the enabled bitmaps).
	live bool
}

// bitmapBytes is the length of the data of a bitmap of granularity
// 1<<granBits over size bytes.
func bitmapBytes(size int64, granBits uint8) uint64 {
	return divRoundUp(divRoundUp(uint64(size), uint64(1)<<granBits), 8)
}

// defaultGranularity is bdrv_get_default_bitmap_granularity.
func (img *Image) defaultGranularity() int64 {
	return min(max(img.lay.ClusterSize, 4096), 65536)
}

func (img *Image) findBitmap(name string) int {
	for i := range img.bitmaps {
		if img.bitmaps[i].Name == name {
			return i
		}
	}
	return -1
}

func errBitmapNotFound(name string) error {
	return formats.Errorf(formats.ErrInvalidOption, "Dirty bitmap '%s' not found", name)
}

// loadBitmap reads bitmap e's data (load_bitmap_data), checking its table
// as QEMU does.
func (img *Image) loadBitmap(e *BitmapEntry) ([]byte, error) {
	cs := uint64(img.lay.ClusterSize)
	n := bitmapBytes(img.size, e.GranularityBits)
	if n > bitmapMaxPhysSize || uint64(e.TableSize) != divRoundUp(n, cs) || e.TableSize > bitmapMaxTableSize ||
		e.TableOffset&(cs-1) != 0 || e.TableOffset >= maxHostOffset {
		return nil, errorf(formats.ErrCorrupt, "Bitmap '%s' doesn't satisfy the constraints", e.Name)
	}
	raw := make([]byte, uint64(e.TableSize)*8)
	if _, err := img.file.ReadAt(raw, int64(e.TableOffset)); err != nil {
		return nil, fmt.Errorf("Could not read bitmap '%s' table at %#x: %w", e.Name, e.TableOffset, err)
	}
	data := make([]byte, n)
	for i := uint64(0); i < uint64(e.TableSize); i++ {
		ent := binary.BigEndian.Uint64(raw[8*i:])
		chunk := data[i*cs : min(n, (i+1)*cs)]
		off := ent & OffsetMask
		switch {
		case ent&bitmapTableReserved != 0 || off&(cs-1) != 0 || (off == 0 && ent > 1):
			return nil, errorf(formats.ErrCorrupt, "Bitmap '%s' has an invalid table entry %#x at index %d", e.Name, ent, i)
		case off == 0 && ent == 1:
			for j := range chunk {
				chunk[j] = 0xff
			}
		case off != 0:
			if _, err := img.file.ReadAt(chunk, int64(off)); err != nil {
				return nil, fmt.Errorf("Could not read bitmap '%s' data at %#x: %w", e.Name, off, err)
			}
		}
	}
	fitBitmap(data, img.size, e.GranularityBits)
	return data, nil
}

// fitBitmap resizes b to a bitmap over size bytes, clearing the bits
// past the end (an image that was resized, or padding in the last byte).
func fitBitmap(b []byte, size int64, granBits uint8) []byte {
	n := bitmapBytes(size, granBits)
	if uint64(len(b)) < n {
		b = append(b, make([]byte, n-uint64(len(b)))...)
	}
	b = b[:n]
	nbits := divRoundUp(uint64(size), uint64(1)<<granBits)
	if r := nbits % 8; r != 0 {
		b[n-1] &= byte(1)<<r - 1
	}
	return b
}

// setBits sets bits [from, to) of b.
func setBits(b []byte, from, to uint64) {
	for i := from; i < to; {
		if i%8 == 0 && to-i >= 8 {
			b[i/8] = 0xff
			i += 8
			continue
		}
		b[i/8] |= 1 << (i % 8)
		i++
	}
}

// markRange sets in b (granularity 1<<granBits) the bits covering guest
// bytes [off, off+n).
func markRange(b []byte, granBits uint8, off, n int64) {
	if n <= 0 {
		return
	}
	from := uint64(off) >> granBits
	to := (uint64(off+n-1) >> granBits) + 1
	to = min(to, uint64(len(b))*8)
	if from < to {
		setBits(b, from, to)
	}
}

// mergeBits sets in dst every range dirty in src (granularities may
// differ, as hbitmap_merge allows).
func mergeBits(dst []byte, dstGran uint8, src *formats.DirtyBitmap) {
	for i, v := range src.Bits {
		for v != 0 {
			j := bits.TrailingZeros8(v)
			v &^= 1 << j
			start := (int64(i)*8 + int64(j)) * src.Granularity
			if start >= src.Size {
				return
			}
			markRange(dst, dstGran, start, min(src.Granularity, src.Size-start))
		}
	}
}

// markBitmapsInUse runs before the first change to guest data since
// open or since the bitmaps were last stored: every enabled, consistent
// bitmap is loaded to track the writes and flagged in use on disk, as
// QEMU does when it opens an image read-write, so that a crash leaves
// them marked inconsistent rather than silently stale. img.mu is held.
func (img *Image) markBitmapsInUse() error {
	if img.bm.live || img.hdr.Bitmaps == nil {
		return nil
	}
	marked := false
	for i := range img.bitmaps {
		b := &img.bitmaps[i]
		if b.Flags&BitmapAuto == 0 || b.Flags&BitmapInUse != 0 {
			continue
		}
		if _, ok := img.bm.bits[b.Name]; !ok {
			data, err := img.loadBitmap(b)
			if err != nil {
				return err
			}
			if img.bm.bits == nil {
				img.bm.bits = map[string][]byte{}
			}
			img.bm.bits[b.Name] = data
		}
		var f [4]byte
		binary.BigEndian.PutUint32(f[:], b.Flags|BitmapInUse)
		if _, err := img.file.WriteAt(f[:], int64(img.hdr.Bitmaps.DirectoryOff+b.DirOffset+12)); err != nil {
			return err
		}
		b.Flags |= BitmapInUse
		img.bm.tracked = append(img.bm.tracked, b.Name)
		marked = true
	}
	img.bm.live = true
	if !marked {
		return nil
	}
	return img.file.Sync()
}

// trackWrite records a change of guest bytes [off, off+n) (a write, a
// zero write or a discard) in the enabled bitmaps. img.mu is held.
func (img *Image) trackWrite(off, n int64) error {
	if err := img.markBitmapsInUse(); err != nil {
		return err
	}
	for _, name := range img.bm.tracked {
		i := img.findBitmap(name)
		if i < 0 {
			continue
		}
		b := fitBitmap(img.bm.bits[name], img.size, img.bitmaps[i].GranularityBits)
		markRange(b, img.bitmaps[i].GranularityBits, off, n)
		img.bm.bits[name] = b
	}
	return nil
}

// storeBitmaps writes the tracked bitmaps back and clears their in-use
// flags (qcow2_store_persistent_dirty_bitmaps on close). img.mu is held.
func (img *Image) storeBitmaps() error {
	if len(img.bm.bits) == 0 {
		return nil
	}
	list := append([]BitmapEntry(nil), img.bitmaps...)
	for _, name := range img.bm.tracked {
		if i := img.findBitmap(name); i >= 0 {
			list[i].Flags &^= BitmapInUse
		}
	}
	return img.commitBitmaps(list)
}

// commitBitmaps makes list the image's bitmap directory. Entries whose
// data is loaded in img.bm.bits get new data clusters and tables; the
// others keep theirs. Tables of bitmaps that were rewritten or dropped
// are freed last. Afterwards nothing is loaded or tracked. img.mu is
// held.
func (img *Image) commitBitmaps(list []BitmapEntry) error {
	if img.hdr.Version < 3 {
		return errorf(formats.ErrUnsupported, "Cannot store dirty bitmaps in qcow2 v2 files")
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	for i := range list {
		data, ok := img.bm.bits[list[i].Name]
		if !ok {
			continue
		}
		data = fitBitmap(data, img.size, list[i].GranularityBits)
		off, n, err := img.writeBitmapData(data)
		if err != nil {
			return err
		}
		list[i].TableOffset, list[i].TableSize = off, n
	}
	var ext *BitmapsExt
	if len(list) > 0 {
		dir := encodeBitmapDirectory(list)
		if uint64(len(dir)) > maxBitmapDirBytes {
			return errorf(formats.ErrUnsupported, "Not enough space in the bitmap directory")
		}
		cs := img.lay.ClusterSize
		off, err := img.allocClusters((int64(len(dir)) + cs - 1) / cs)
		if err != nil {
			return err
		}
		if err := img.checkOverlap(off, uint64(len(dir))); err != nil {
			return err
		}
		if _, err := img.file.WriteAt(dir, int64(off)); err != nil {
			return err
		}
		ext = &BitmapsExt{NbBitmaps: uint32(len(list)), DirectorySize: uint64(len(dir)), DirectoryOff: off}
	}
	// Everything the new header points to, and its refcounts, first.
	if err := img.flushRefcounts(); err != nil {
		return err
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	oldExt, oldList := img.hdr.Bitmaps, img.bitmaps
	img.hdr.Bitmaps = ext
	if ext != nil {
		img.hdr.AutoclearFeatures |= AutoclearBitmaps
	} else {
		img.hdr.AutoclearFeatures &^= AutoclearBitmaps
	}
	if err := img.writeHeader(); err != nil {
		img.hdr.Bitmaps = oldExt
		return fmt.Errorf("Could not update qcow2 header: %w", err)
	}
	var dirOff uint64
	for i := range list {
		list[i].DirOffset = dirOff
		dirOff += bitmapEntrySize(&list[i])
	}
	img.bitmaps = list
	img.bm = bitmapState{}
	if oldExt != nil {
		cs := uint64(img.lay.ClusterSize)
		if err := img.freeClusters(int64(oldExt.DirectoryOff/cs), int64(divRoundUp(oldExt.DirectorySize, cs)), false); err != nil {
			return err
		}
	}
	kept := map[uint64]bool{}
	for i := range list {
		kept[list[i].TableOffset] = true
	}
	for i := range oldList {
		if !kept[oldList[i].TableOffset] {
			if err := img.freeBitmapTable(&oldList[i]); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeBitmapData stores data in new clusters, all-zero clusters as
// table entry 0, and returns the new table's offset and size.
func (img *Image) writeBitmapData(data []byte) (uint64, uint32, error) {
	cs := img.lay.ClusterSize
	n := (int64(len(data)) + cs - 1) / cs
	table := make([]byte, n*8)
	for i := int64(0); i < n; i++ {
		chunk := data[i*cs : min(int64(len(data)), (i+1)*cs)]
		if formats.IsZero(chunk) {
			continue
		}
		off, err := img.allocClusters(1)
		if err != nil {
			return 0, 0, err
		}
		buf := make([]byte, cs)
		copy(buf, chunk)
		if _, err := img.file.WriteAt(buf, int64(off)); err != nil {
			return 0, 0, err
		}
		binary.BigEndian.PutUint64(table[8*i:], off)
	}
	off, err := img.allocClusters(max(1, (int64(len(table))+cs-1)/cs))
	if err != nil {
		return 0, 0, err
	}
	if _, err := img.file.WriteAt(table, int64(off)); err != nil {
		return 0, 0, err
	}
	return off, uint32(n), nil
}

// freeBitmapTable frees a stored bitmap's data clusters and table.
func (img *Image) freeBitmapTable(e *BitmapEntry) error {
	cs := uint64(img.lay.ClusterSize)
	if e.TableOffset == 0 || e.TableSize > bitmapMaxTableSize || e.TableOffset&(cs-1) != 0 {
		return nil
	}
	raw := make([]byte, uint64(e.TableSize)*8)
	if _, err := img.file.ReadAt(raw, int64(e.TableOffset)); err != nil {
		return err
	}
	for i := 0; i < len(raw); i += 8 {
		off := binary.BigEndian.Uint64(raw[i:]) & OffsetMask
		if off != 0 && off&(cs-1) == 0 {
			if err := img.freeClusters(int64(off/cs), 1, false); err != nil {
				return err
			}
		}
	}
	return img.freeClusters(int64(e.TableOffset/cs), int64(divRoundUp(uint64(len(raw)), cs)), false)
}

func bitmapEntrySize(e *BitmapEntry) uint64 {
	return (bitmapEntryLen + uint64(len(e.Extra)) + uint64(len(e.Name)) + 7) &^ 7
}

// encodeBitmapDirectory is the inverse of ReadBitmapDirectory.
func encodeBitmapDirectory(list []BitmapEntry) []byte {
	var dir []byte
	be := binary.BigEndian
	for i := range list {
		e := &list[i]
		b := make([]byte, bitmapEntrySize(e))
		be.PutUint64(b[0:], e.TableOffset)
		be.PutUint32(b[8:], e.TableSize)
		be.PutUint32(b[12:], e.Flags)
		b[16] = bitmapTypeDirty
		b[17] = e.GranularityBits
		be.PutUint16(b[18:], uint16(len(e.Name)))
		be.PutUint32(b[20:], uint32(len(e.Extra)))
		copy(b[bitmapEntryLen:], e.Extra)
		copy(b[bitmapEntryLen+len(e.Extra):], e.Name)
		dir = append(dir, b...)
	}
	return dir
}

// Bitmaps lists the persistent bitmaps.
func (img *Image) Bitmaps() ([]formats.BitmapInfo, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	out := make([]formats.BitmapInfo, len(img.bitmaps))
	for i := range img.bitmaps {
		b := &img.bitmaps[i]
		out[i] = formats.BitmapInfo{
			Name:        b.Name,
			Granularity: 1 << b.GranularityBits,
			Enabled:     b.Flags&BitmapAuto != 0,
			InUse:       b.Flags&BitmapInUse != 0 && !img.isTracked(b.Name),
		}
	}
	return out, nil
}

func (img *Image) isTracked(name string) bool {
	for _, n := range img.bm.tracked {
		if n == name {
			return true
		}
	}
	return false
}

// bitmapOp runs a change of the bitmap directory: tracked bitmaps are
// stored first, so the change starts from a consistent directory.
func (img *Image) bitmapOp(fn func() error) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if err := img.storeBitmaps(); err != nil {
		return err
	}
	err := fn()
	if err != nil {
		// Data loaded for a change that did not happen is dropped, so
		// the next store does not write it.
		img.bm.bits = nil
	}
	return err
}

// usableBitmap is bdrv_dirty_bitmap_check for an operation that uses or
// changes the bitmap's bits or state: inconsistent bitmaps are refused.
func usableBitmap(e *BitmapEntry) error {
	if e.Flags&BitmapInUse != 0 {
		return formats.Errorf(formats.ErrInvalidOption, "Bitmap '%s' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk", e.Name)
	}
	return nil
}

// AddBitmap is block-dirty-bitmap-add with persistent=true, with QEMU's
// checks in its order.
func (img *Image) AddBitmap(name string, granularity int64, disabled bool) error {
	return img.bitmapOp(func() error {
		if granularity == 0 {
			granularity = img.defaultGranularity()
		}
		if g := uint32(granularity); int64(g) != granularity || g < 512 || g&(g-1) != 0 {
			return formats.Errorf(formats.ErrInvalidOption, "Granularity must be power of 2 and at least 512")
		}
		if name == "" {
			return formats.Errorf(formats.ErrInvalidOption, "Bitmap name cannot be empty")
		}
		if img.findBitmap(name) >= 0 {
			return formats.Errorf(formats.ErrInvalidOption, "Bitmap already exists: %s", name)
		}
		if err := img.canStoreBitmap(name, granularity); err != nil {
			return formats.Errorf(formats.ErrInvalidOption, "Can't make bitmap '%s' persistent in '%s': %s", name, formats.QEMUNodeName, err)
		}
		e := BitmapEntry{Name: name, GranularityBits: uint8(bits.TrailingZeros64(uint64(granularity)))}
		if !disabled {
			e.Flags = BitmapAuto
		}
		img.bm.bits = map[string][]byte{name: make([]byte, bitmapBytes(img.size, e.GranularityBits))}
		return img.commitBitmaps(append(append([]BitmapEntry(nil), img.bitmaps...), e))
	})
}

// canStoreBitmap is qcow2_co_can_store_new_dirty_bitmap.
func (img *Image) canStoreBitmap(name string, granularity int64) error {
	if img.hdr.Version < 3 {
		return fmt.Errorf("Cannot store dirty bitmaps in qcow2 v2 files")
	}
	if len(img.bitmaps) >= maxBitmaps {
		return fmt.Errorf("Maximum number of persistent bitmaps is already reached")
	}
	var dir uint64
	for i := range img.bitmaps {
		dir += bitmapEntrySize(&img.bitmaps[i])
	}
	if dir+(bitmapEntryLen+uint64(len(name))+7)&^7 > maxBitmapDirBytes {
		return fmt.Errorf("Not enough space in the bitmap directory")
	}
	gb := uint8(bits.TrailingZeros64(uint64(granularity)))
	n := bitmapBytes(img.size, gb)
	switch {
	case gb > bitmapMaxGranularity:
		return fmt.Errorf("Granularity exceeds maximum (%d bytes)", uint64(1)<<bitmapMaxGranularity)
	case n > bitmapMaxPhysSize || n > uint64(bitmapMaxTableSize)*uint64(img.lay.ClusterSize):
		return fmt.Errorf("Too much space will be occupied by the bitmap. Use larger granularity")
	case len(name) > bitmapMaxNameLen:
		return fmt.Errorf("Name length exceeds maximum (%d characters)", bitmapMaxNameLen)
	}
	return nil
}

// RemoveBitmap is block-dirty-bitmap-remove; inconsistent bitmaps may
// be removed.
func (img *Image) RemoveBitmap(name string) error {
	return img.bitmapOp(func() error {
		i := img.findBitmap(name)
		if i < 0 {
			return errBitmapNotFound(name)
		}
		list := append(append([]BitmapEntry(nil), img.bitmaps[:i]...), img.bitmaps[i+1:]...)
		return img.commitBitmaps(list)
	})
}

// ClearBitmap is block-dirty-bitmap-clear.
func (img *Image) ClearBitmap(name string) error {
	return img.changeBitmap(name, func(e *BitmapEntry, data []byte) []byte {
		clear(data)
		return data
	})
}

// EnableBitmap is block-dirty-bitmap-enable.
func (img *Image) EnableBitmap(name string) error {
	return img.setAuto(name, true)
}

// DisableBitmap is block-dirty-bitmap-disable.
func (img *Image) DisableBitmap(name string) error {
	return img.setAuto(name, false)
}

func (img *Image) setAuto(name string, on bool) error {
	return img.bitmapOp(func() error {
		i := img.findBitmap(name)
		if i < 0 {
			return errBitmapNotFound(name)
		}
		if err := usableBitmap(&img.bitmaps[i]); err != nil {
			return err
		}
		list := append([]BitmapEntry(nil), img.bitmaps...)
		if on {
			list[i].Flags |= BitmapAuto
		} else {
			list[i].Flags &^= BitmapAuto
		}
		if list[i].Flags == img.bitmaps[i].Flags {
			return nil
		}
		return img.commitBitmaps(list)
	})
}

// changeBitmap loads bitmap name, lets fn change its data and stores it.
func (img *Image) changeBitmap(name string, fn func(e *BitmapEntry, data []byte) []byte) error {
	return img.bitmapOp(func() error {
		i := img.findBitmap(name)
		if i < 0 {
			return errBitmapNotFound(name)
		}
		e := &img.bitmaps[i]
		if err := usableBitmap(e); err != nil {
			return err
		}
		data, err := img.loadBitmap(e)
		if err != nil {
			return err
		}
		img.bm.bits = map[string][]byte{name: fn(e, data)}
		return img.commitBitmaps(append([]BitmapEntry(nil), img.bitmaps...))
	})
}

// BitmapData returns a copy of bitmap name's bits, including writes
// not yet stored.
func (img *Image) BitmapData(name string) (*formats.DirtyBitmap, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	i := img.findBitmap(name)
	if i < 0 {
		return nil, errBitmapNotFound(name)
	}
	e := &img.bitmaps[i]
	data, ok := img.bm.bits[name]
	if !ok {
		if err := usableBitmap(e); err != nil {
			return nil, err
		}
	}
	if ok {
		data = append([]byte(nil), fitBitmap(data, img.size, e.GranularityBits)...)
	} else {
		var err error
		if data, err = img.loadBitmap(e); err != nil {
			return nil, err
		}
	}
	return &formats.DirtyBitmap{Granularity: 1 << e.GranularityBits, Size: img.size, Bits: data}, nil
}

// MergeBitmap is block-dirty-bitmap-merge of src into bitmap dst.
func (img *Image) MergeBitmap(dst string, src *formats.DirtyBitmap) error {
	img.mu.Lock()
	size := img.size
	img.mu.Unlock()
	if src.Size != size {
		return formats.Errorf(formats.ErrInvalidOption, "Bitmaps are of different sizes (destination size is %d, source size is %d) and can't be merged", size, src.Size)
	}
	return img.changeBitmap(dst, func(e *BitmapEntry, data []byte) []byte {
		mergeBits(data, e.GranularityBits, src)
		return data
	})
}

var _ formats.Bitmapper = (*Image)(nil)
