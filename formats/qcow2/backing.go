package qcow2

import (
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

var (
	_ formats.BackingChanger = (*Image)(nil)
	_ formats.Emptier        = (*Image)(nil)
)

// SetBacking records a new backing file name and format in the header
// (qcow2_change_backing_file); name "" removes both. Cached metadata and
// data reach the disk before the header changes.
func (img *Image) SetBacking(name, format string) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if name != "" && (img.hdr.AutoclearFeatures&AutoclearDataFileRaw != 0 || len(name) > maxBackingNameLen) {
		// A raw data file alone must make sense of the content.
		return formats.ErrnoError{Err: syscall.EINVAL}
	}
	if name == "" && format != "" {
		return formats.ErrnoError{Err: syscall.EINVAL}
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	if img.data != img.file {
		if err := img.data.Sync(); err != nil {
			return err
		}
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	oldName, oldFormat := img.hdr.BackingFile, img.hdr.BackingFormat
	img.hdr.BackingFile, img.hdr.BackingFormat = name, format
	if _, err := img.hdr.Encode(); err != nil {
		img.hdr.BackingFile, img.hdr.BackingFormat = oldName, oldFormat
		return formats.ErrnoError{Err: syscall.ENOSPC}
	}
	return img.writeHeader()
}

// MakeEmpty drops every cluster so that the image reads entirely as its
// backing file (qcow2_make_empty). A plain v3 image is rebuilt from
// scratch as QEMU's make_completely_empty does (header, refcount table,
// one refcount block, the L1 table, nothing else); other images get a
// full discard of the whole virtual size, here without allocating L2
// tables that do not exist.
func (img *Image) MakeEmpty() error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if err := img.markBitmapsInUse(); err != nil {
		return err
	}
	l1Clusters := (int64(len(img.l1))*8 + img.lay.ClusterSize - 1) >> img.lay.ClusterBits
	if img.hdr.Version >= 3 && len(img.snapshots) == 0 && img.hdr.Bitmaps == nil &&
		3+l1Clusters <= img.lay.RefblockEntries && !img.lay.HasDataFile {
		return img.makeCompletelyEmpty(l1Clusters)
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	cs := img.lay.ClusterSize
	return img.fullDiscard(0, (img.size+cs-1)&^(cs-1), false)
}

// makeCompletelyEmpty is QEMU's make_completely_empty. Under the dirty
// bit it zeroes the L1 table and clusters 1 up to the new L1 table,
// points the header at a refcount table in cluster 1 and an L1 table in
// cluster 3, enters the refcount block in cluster 2, takes the
// references of those clusters, clears the dirty bit and cuts the file.
func (img *Image) makeCompletelyEmpty(l1Clusters int64) error {
	cs := img.lay.ClusterSize
	if err := img.flushCaches(); err != nil {
		return err
	}
	if err := img.setDirtyBit(true); err != nil {
		return err
	}
	zero := func(off, n int64) error {
		if err := img.writeZeroRange(off, off+n); err != nil {
			return err
		}
		return img.file.Sync()
	}
	if err := zero(int64(img.hdr.L1TableOffset), l1Clusters*cs); err != nil {
		return err
	}
	clear(img.l1)
	img.tablesChanged()
	if err := zero(cs, (2+l1Clusters)*cs); err != nil {
		return err
	}
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], uint64(3*cs))
	binary.BigEndian.PutUint64(h[8:], uint64(cs))
	binary.BigEndian.PutUint32(h[16:], 1)
	if err := img.writeSync(h[:], 40); err != nil {
		return err
	}
	img.hdr.L1TableOffset = uint64(3 * cs)
	img.hdr.RefcountTableOffset, img.hdr.RefcountTableClusters = uint64(cs), 1
	img.reftable = make([]uint64, cs/8)
	img.tablesChanged()
	img.newCaches()
	img.l2NeedsRefcounts, img.refcountsNeedL2 = false, false
	img.freeHint, img.freeBytePos = 0, 0
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], uint64(2*cs))
	if err := img.writeSync(e[:], uint64(cs)); err != nil {
		return err
	}
	img.reftable[0] = uint64(2 * cs)
	img.tablesChanged()
	if err := img.updateRefcounts(0, 3+l1Clusters, 1); err != nil {
		return err
	}
	img.freeHint = 3 + l1Clusters
	if err := img.flushCaches(); err != nil {
		return err
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	if err := img.setDirtyBit(false); err != nil {
		return err
	}
	return img.file.Truncate((3 + l1Clusters) * cs)
}
