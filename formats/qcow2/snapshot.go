package qcow2

import (
	"encoding/binary"
	"io"
	"math"

	"github.com/imgfs/imgfs/formats"
)

// snapshotHeaderLen is the fixed part of a snapshot table entry.
const snapshotHeaderLen = 40

// SnapshotEntry is one entry of the internal snapshot table.
type SnapshotEntry struct {
	L1TableOffset uint64
	L1Size        uint32
	ID            string
	Name          string
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64
	// VMStateSize is the 64-bit size from the extra data when present,
	// else the 32-bit header field.
	VMStateSize uint64
	// DiskSize is the guest size when the snapshot was taken, from the
	// extra data; HasDiskSize says it was there.
	DiskSize    uint64
	HasDiskSize bool
	// ICount is the instruction count, ^0 when not recorded.
	ICount uint64
	// Extra is the whole extra data area, kept for rewriting the table.
	Extra []byte
	// Offset and Len locate the entry in the image, padding included.
	Offset uint64
	Len    uint64
}

// ReadSnapshotTable reads the snapshot table described by the header.
// It enforces QEMU's limits: at most maxSnapshots entries, extra data of
// at most maxSnapshotExtraData bytes each, and maxSnapshotTableBytes in
// all. Errors read as QEMU's messages.
func ReadSnapshotTable(r io.ReaderAt, h *Header) ([]SnapshotEntry, error) {
	if h.NbSnapshots == 0 {
		return nil, nil
	}
	if h.NbSnapshots > maxSnapshots {
		return nil, errorf(formats.ErrCorrupt, "Snapshot table too large")
	}
	if h.SnapshotsOffset&(h.ClusterSize()-1) != 0 || h.SnapshotsOffset >= maxHostOffset {
		return nil, errorf(formats.ErrCorrupt, "Snapshot table offset invalid")
	}
	be := binary.BigEndian
	out := make([]SnapshotEntry, 0, min(h.NbSnapshots, 1024))
	off := h.SnapshotsOffset
	var fixed [snapshotHeaderLen]byte
	for i := 0; i < int(h.NbSnapshots); i++ {
		start := off
		if _, err := r.ReadAt(fixed[:], int64(off)); err != nil {
			return nil, errorf(formats.ErrCorrupt, "Failed to read snapshot table: %v", err)
		}
		sn := SnapshotEntry{
			L1TableOffset: be.Uint64(fixed[0:]),
			L1Size:        be.Uint32(fixed[8:]),
			DateSec:       be.Uint32(fixed[16:]),
			DateNsec:      be.Uint32(fixed[20:]),
			VMClockNsec:   be.Uint64(fixed[24:]),
			VMStateSize:   uint64(be.Uint32(fixed[32:])),
			ICount:        ^uint64(0),
			Offset:        start,
		}
		idLen := uint64(be.Uint16(fixed[12:]))
		nameLen := uint64(be.Uint16(fixed[14:]))
		extraLen := uint64(be.Uint32(fixed[36:]))
		if extraLen > maxSnapshotExtraData {
			return nil, errorf(formats.ErrCorrupt, "Too much extra metadata in snapshot table entry %d", i)
		}
		off += snapshotHeaderLen
		// id, name and extra are bounded (64 KiB + 64 KiB + 1 KiB), so
		// one buffer for all three is safe to allocate.
		buf := make([]byte, extraLen+idLen+nameLen)
		if _, err := r.ReadAt(buf, int64(off)); err != nil {
			return nil, errorf(formats.ErrCorrupt, "Failed to read snapshot table: %v", err)
		}
		sn.Extra = buf[:extraLen:extraLen]
		if extraLen >= 8 {
			sn.VMStateSize = be.Uint64(sn.Extra[0:])
		}
		if extraLen >= 16 {
			sn.DiskSize = be.Uint64(sn.Extra[8:])
			sn.HasDiskSize = true
		}
		if extraLen >= 24 {
			sn.ICount = be.Uint64(sn.Extra[16:])
		}
		sn.ID = string(buf[extraLen : extraLen+idLen])
		sn.Name = string(buf[extraLen+idLen:])
		off += extraLen + idLen + nameLen
		off = (off + 7) &^ 7
		sn.Len = off - start
		if off-h.SnapshotsOffset > maxSnapshotTableBytes {
			return nil, errorf(formats.ErrCorrupt, "Snapshot table is too big")
		}
		out = append(out, sn)
	}
	return out, nil
}

// info converts the entry to what `qemu-img info` and `snapshot -l` show.
func (sn *SnapshotEntry) info() formats.Snapshot {
	return formats.Snapshot{
		ID:          sn.ID,
		Name:        sn.Name,
		VMStateSize: sn.VMStateSize,
		DateSec:     sn.DateSec,
		DateNsec:    sn.DateNsec,
		VMClockNsec: sn.VMClockNsec,
		ICount:      sn.ICount,
		HasICount:   sn.ICount != ^uint64(0),
	}
}

// tableSize is the byte size of the snapshot table as read (0 without
// snapshots), what qcow2_write_snapshots frees when it moves the table.
func (img *Image) snapshotTableSize() int64 {
	if len(img.snapshots) == 0 {
		return 0
	}
	last := img.snapshots[len(img.snapshots)-1]
	return int64(last.Offset + last.Len - img.hdr.SnapshotsOffset)
}

// writeSnapshotTable is qcow2_write_snapshots: list is written as the new
// snapshot table to newly allocated clusters, with at least the 24
// bytes of extra data QEMU knows in every entry; the header is switched
// to it, and the old table (oldSize bytes) is freed. On success
// img.snapshots is list as read back from the image.
func (img *Image) writeSnapshotTable(list []SnapshotEntry, oldSize int64) error {
	h := img.hdr
	buf, err := img.encodeSnapshotTable(list)
	if err != nil {
		return err
	}
	var off uint64
	if len(buf) > 0 {
		n := (int64(len(buf)) + img.lay.ClusterSize - 1) >> img.lay.ClusterBits
		if off, err = img.allocClusters(n); err != nil {
			return err
		}
	}
	// The new clusters' refcounts reach the disk before the table, the
	// table before the header that names it.
	if err := img.flushCaches(); err != nil {
		return err
	}
	if len(buf) > 0 {
		if err := img.writeSync(buf, off); err != nil {
			return err
		}
	}
	var ptr [12]byte
	binary.BigEndian.PutUint32(ptr[:], uint32(len(list)))
	binary.BigEndian.PutUint64(ptr[4:], off)
	if err := img.writeSync(ptr[:], 60); err != nil {
		return err
	}
	oldOff := h.SnapshotsOffset
	h.NbSnapshots, h.SnapshotsOffset = uint32(len(list)), off
	if oldSize > 0 {
		first := int64(oldOff >> img.lay.ClusterBits)
		last := int64((oldOff + uint64(oldSize) - 1) >> img.lay.ClusterBits)
		// QEMU discards freed snapshot clusters (discard-snapshot=on).
		if err := img.freeClusters(first, last-first+1, true); err != nil {
			return err
		}
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	snaps, err := ReadSnapshotTable(img.file, h)
	if err != nil {
		return err
	}
	img.snapshots = snaps
	return nil
}

// snapshotExtraLen is the extra data QEMU 7.2 writes for every snapshot:
// the 64-bit VM state size, the disk size and the instruction count.
const snapshotExtraLen = 24

// encodeSnapshotTable lays out list as qcow2_write_snapshots does:
// entries 8-byte aligned, no padding after the last one.
func (img *Image) encodeSnapshotTable(list []SnapshotEntry) ([]byte, error) {
	be := binary.BigEndian
	var buf []byte
	for _, sn := range list {
		// QEMU holds ID and name as C strings: a NUL ends them.
		id, name := cString([]byte(sn.ID)), cString([]byte(sn.Name))
		if len(id) > math.MaxUint16 || len(name) > math.MaxUint16 {
			return nil, errorf(formats.ErrInvalidOption, "snapshot ID or name longer than %d bytes", math.MaxUint16)
		}
		buf = append(buf, make([]byte, (8-len(buf)%8)%8)...)
		var hdr [snapshotHeaderLen]byte
		be.PutUint64(hdr[0:], sn.L1TableOffset)
		be.PutUint32(hdr[8:], sn.L1Size)
		be.PutUint16(hdr[12:], uint16(len(id)))
		be.PutUint16(hdr[14:], uint16(len(name)))
		be.PutUint32(hdr[16:], sn.DateSec)
		be.PutUint32(hdr[20:], sn.DateNsec)
		be.PutUint64(hdr[24:], sn.VMClockNsec)
		if sn.VMStateSize <= math.MaxUint32 {
			// Larger states are only in the extra data, so that old
			// readers see a disk-only snapshot rather than a cut one.
			be.PutUint32(hdr[32:], uint32(sn.VMStateSize))
		}
		be.PutUint32(hdr[36:], uint32(max(snapshotExtraLen, len(sn.Extra))))
		var extra [snapshotExtraLen]byte
		be.PutUint64(extra[0:], sn.VMStateSize)
		be.PutUint64(extra[8:], sn.diskSize(img.size))
		be.PutUint64(extra[16:], sn.ICount)
		buf = append(buf, hdr[:]...)
		buf = append(buf, extra[:]...)
		if len(sn.Extra) > snapshotExtraLen {
			buf = append(buf, sn.Extra[snapshotExtraLen:]...)
		}
		buf = append(buf, id...)
		buf = append(buf, name...)
		if len(buf) > maxSnapshotTableBytes {
			return nil, errCheckTooLarge
		}
	}
	return buf, nil
}

// diskSize is the guest size the snapshot was taken at: from the extra
// data, or for old entries without it the current size (as QEMU assumes).
func (sn *SnapshotEntry) diskSize(current int64) uint64 {
	if sn.HasDiskSize {
		return sn.DiskSize
	}
	return uint64(current) &^ 511
}
