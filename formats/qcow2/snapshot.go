package qcow2

import (
	"encoding/binary"
	"io"

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
