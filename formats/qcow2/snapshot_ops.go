package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// Internal snapshots as QEMU's block/qcow2-snapshot.c takes, reverts to
// and deletes them. A snapshot is a copy of the active L1 table whose
// clusters gained one reference each; COPIED flags in the tables tell
// which clusters have exactly one reference and may be written in place.

var _ formats.Snapshotter = (*Image)(nil)

// Snapshots lists the internal snapshots in table order.
// Like qcow2_snapshot_list, it refuses images with an external data
// file.
func (img *Image) Snapshots() ([]formats.Snapshot, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.snapshotsSupported(); err != nil {
		return nil, err
	}
	out := make([]formats.Snapshot, len(img.snapshots))
	for i := range img.snapshots {
		out[i] = img.snapshots[i].info()
	}
	return out, nil
}

// findSnapshot is find_snapshot_by_id_and_name: the index of the first
// snapshot with that ID and name ("" matches any, not both ""), or -1.
func (img *Image) findSnapshot(id, name string) int {
	if id == "" && name == "" {
		return -1
	}
	return slices.IndexFunc(img.snapshots, func(sn SnapshotEntry) bool {
		return (id == "" || sn.ID == id) && (name == "" || sn.Name == name)
	})
}

// findSnapshotByIDOrName is find_snapshot_by_id_or_name: by ID first,
// then by name.
func (img *Image) findSnapshotByIDOrName(s string) int {
	if i := img.findSnapshot(s, ""); i >= 0 {
		return i
	}
	return img.findSnapshot("", s)
}

// snapshotNotFound is the error for a snapshot that does not exist; its
// errno is ENOENT as QEMU returns.
func snapshotNotFound(what string) error {
	return fmt.Errorf("%w: %q: %w", formats.ErrSnapshotNotFound, what, formats.ErrnoError{Err: syscall.ENOENT})
}

// nextSnapshotID is find_new_snapshot_id: one more than the largest ID
// read as strtoul reads it.
func (img *Image) nextSnapshotID() string {
	var top uint64
	for _, sn := range img.snapshots {
		top = max(top, strtoul(sn.ID))
	}
	return fmt.Sprint(top + 1)
}

// strtoul reads a decimal number as C's strtoul(s, NULL, 10): leading
// white space and a sign are skipped, reading stops at the first
// non-digit, overflow gives the maximum, and a minus sign negates.
func strtoul(s string) uint64 {
	s = strings.TrimLeft(s, " \t\n\v\f\r")
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	var v uint64
	for i := 0; i < len(s) && s[i] >= '0' && s[i] <= '9'; i++ {
		d := uint64(s[i] - '0')
		if v > (math.MaxUint64-d)/10 {
			return math.MaxUint64
		}
		v = v*10 + d
	}
	if neg {
		return -v
	}
	return v
}

// readSnapshotL1 validates and reads a snapshot's L1 table.
func (img *Image) readSnapshotL1(sn *SnapshotEntry) ([]uint64, error) {
	if err := validateTable(img.hdr, sn.L1TableOffset, uint64(sn.L1Size), 8, maxL1Bytes, "Snapshot L1 table"); err != nil {
		return nil, err
	}
	l1, err := readTable(img.file, sn.L1TableOffset, int64(sn.L1Size))
	if err != nil {
		return nil, fmt.Errorf("Failed to read l1 table for snapshot: %w", err)
	}
	return l1, nil
}

// snapshotsSupported refuses images with an external data file, whose
// data clusters have no refcounts (QEMU returns -ENOTSUP).
func (img *Image) snapshotsSupported() error {
	if img.lay.HasDataFile {
		return fmt.Errorf("%s: internal snapshots with an external data file: %w: %w",
			img.file.Name(), formats.ErrUnsupported, formats.ErrnoError{Err: syscall.ENOTSUP})
	}
	return nil
}

// CreateSnapshot is qcow2_snapshot_create: the active L1 table is copied
// to new clusters, every cluster it reaches gains a reference (losing
// its COPIED flag), the refcounts reach the disk, and then the snapshot
// table with the new entry is written to a new place and the header
// switched to it. A crash before the header write leaks clusters only.
func (img *Image) CreateSnapshot(s formats.Snapshot) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if len(img.snapshots) >= maxSnapshots {
		return fmt.Errorf("%s: already %d snapshots: %w", img.file.Name(), len(img.snapshots), formats.ErrnoError{Err: syscall.EFBIG})
	}
	if err := img.snapshotsSupported(); err != nil {
		return err
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	sn := SnapshotEntry{
		ID:          img.nextSnapshotID(),
		Name:        s.Name,
		DateSec:     s.DateSec,
		DateNsec:    s.DateNsec,
		VMClockNsec: s.VMClockNsec,
		VMStateSize: s.VMStateSize,
		DiskSize:    uint64(img.size),
		HasDiskSize: true,
		ICount:      ^uint64(0),
		L1Size:      uint32(len(img.l1)),
	}
	if s.HasICount {
		sn.ICount = s.ICount
	}
	l1Bytes := int64(len(img.l1)) * 8
	off, err := img.allocClusters((l1Bytes + img.lay.ClusterSize - 1) >> img.lay.ClusterBits)
	if err != nil {
		return err
	}
	sn.L1TableOffset = off
	if err := img.writeSync(encodeTable(img.l1), off); err != nil {
		return err
	}
	if err := img.updateSnapshotRefcount(img.l1, img.hdr.L1TableOffset, 1); err != nil {
		return err
	}
	list := append(slices.Clone(img.snapshots), sn)
	return img.writeSnapshotTable(list, img.snapshotTableSize())
}

// ApplySnapshot is qcow2_snapshot_goto: the snapshot (by ID, else by
// name) becomes the active L1 table. The snapshot's clusters gain a
// reference before the active L1 table is overwritten on disk, and the
// old active clusters lose theirs only after; then the COPIED flags are
// recomputed. A snapshot taken at another disk size resizes the image
// to it first.
func (img *Image) ApplySnapshot(idOrName string) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.snapshotsSupported(); err != nil {
		return err
	}
	i := img.findSnapshotByIDOrName(idOrName)
	if i < 0 {
		return snapshotNotFound(idOrName)
	}
	sn := img.snapshots[i]
	snL1, err := img.readSnapshotL1(&sn)
	if err != nil {
		return err
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	if disk := int64(sn.diskSize(img.size)); disk != img.size {
		if err := img.resizeForSnapshot(disk); err != nil {
			return err
		}
	}
	if int64(sn.L1Size) > int64(len(img.l1)) {
		if err := img.growL1(int64(sn.L1Size)); err != nil {
			return err
		}
	}
	active := make([]uint64, len(img.l1))
	copy(active, snL1)
	if err := img.updateSnapshotRefcount(snL1, sn.L1TableOffset, 1); err != nil {
		return err
	}
	if err := img.checkOverlapExcept(img.hdr.L1TableOffset, uint64(len(active))*8, "active L1 table"); err != nil {
		return err
	}
	if err := img.writeSync(encodeTable(active), img.hdr.L1TableOffset); err != nil {
		return err
	}
	// The old active table, still in memory, loses its references; the
	// in-memory table follows the disk even when that fails.
	err = img.updateSnapshotRefcount(img.l1, img.hdr.L1TableOffset, -1)
	img.l1 = active
	img.tablesChanged()
	if err != nil {
		return err
	}
	return img.updateSnapshotRefcount(img.l1, img.hdr.L1TableOffset, 0)
}

// resizeForSnapshot sets the virtual size to that of a snapshot about to
// be applied. QEMU truncates the image first; since the active L1 table
// is replaced right after, only its size and the header's size field
// matter here.
func (img *Image) resizeForSnapshot(size int64) error {
	if img.hdr.Version < 3 {
		return errorf(formats.ErrUnsupported, "Can't resize a v2 image which has snapshots")
	}
	if n := img.lay.L1SizeFor(size); n > int64(len(img.l1)) {
		if err := img.growL1(n); err != nil {
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

// DeleteSnapshot is qcow2_snapshot_delete: the entry leaves the snapshot
// table first (a crash after that only leaks clusters), then the
// snapshot's clusters and L1 table lose their reference and the active
// tables' COPIED flags are recomputed.
func (img *Image) DeleteSnapshot(id, name string) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.snapshotsSupported(); err != nil {
		return err
	}
	i := img.findSnapshot(id, name)
	if i < 0 {
		return fmt.Errorf("Can't find the snapshot: %w", snapshotNotFound(id+"/"+name))
	}
	sn := img.snapshots[i]
	snL1, err := img.readSnapshotL1(&sn)
	if err != nil {
		return err
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	list := slices.Delete(slices.Clone(img.snapshots), i, i+1)
	if err := img.writeSnapshotTable(list, img.snapshotTableSize()); err != nil {
		return withErrno("Failed to remove snapshot from snapshot list", err)
	}
	if err := img.updateSnapshotRefcount(snL1, sn.L1TableOffset, -1); err != nil {
		return withErrno("Failed to free the cluster and L1 table", err)
	}
	if sn.L1Size > 0 {
		first := int64(sn.L1TableOffset >> img.lay.ClusterBits)
		last := int64((sn.L1TableOffset + uint64(sn.L1Size)*8 - 1) >> img.lay.ClusterBits)
		if err := img.freeClusters(first, last-first+1, true); err != nil {
			return withErrno("Failed to free the cluster and L1 table", err)
		}
	}
	if err := img.updateSnapshotRefcount(img.l1, img.hdr.L1TableOffset, 0); err != nil {
		return withErrno("Failed to update snapshot status in disk", err)
	}
	return img.flushCaches()
}

// updateSnapshotRefcount is qcow2_update_snapshot_refcount: every
// cluster the L1 table l1 (stored at l1Off) reaches, L2 tables included,
// gains addend references (-1, 0 or 1), and the COPIED flags of its L1
// and L2 entries are set where the refcount is 1 and cleared elsewhere.
// Everything reaches the disk before the L1 table is rewritten with its
// new flags; with addend -1 the table is about to be dropped and is not
// rewritten.
func (img *Image) updateSnapshotRefcount(l1 []uint64, l1Off uint64, addend int64) error {
	lay := &img.lay
	l1Modified := false
	for i, old := range l1 {
		l2off := old & OffsetMask
		if l2off == 0 {
			continue
		}
		if l2off&uint64(lay.ClusterSize-1) != 0 {
			return img.corruptf("L2 table offset %#x unaligned (L1 index: %#x)", l2off, i)
		}
		t, err := img.l2Table(l2off)
		if err != nil {
			return err
		}
		for j := int64(0); j < lay.L2Entries; j++ {
			e := lay.ReadL2Entry(t.data, j)
			var rc uint64
			switch lay.ClusterType(e) {
			case Compressed:
				if addend != 0 {
					host, size := lay.CompressedDescriptor(e)
					first := int64(host >> lay.ClusterBits)
					last := int64((host + uint64(size) - 1) >> lay.ClusterBits)
					if err := img.addSnapshotRefs(first, last-first+1, addend); err != nil {
						return err
					}
				}
				// Compressed clusters are never written in place.
				rc = 2
			case Normal, ZeroAlloc:
				host := e.HostOffset()
				if host&uint64(lay.ClusterSize-1) != 0 {
					return img.corruptf("Cluster allocation offset %#x unaligned (L2 offset: %#x, L2 index: %#x)", host, l2off, j)
				}
				c := int64(host >> lay.ClusterBits)
				if addend != 0 {
					if err := img.addSnapshotRefs(c, 1, addend); err != nil {
						return err
					}
				}
				if rc, err = img.Refcount(c); err != nil {
					return err
				}
			}
			n := e
			if rc == 1 {
				n.Raw |= OflagCopied
			} else {
				n.Raw &^= OflagCopied
			}
			if n != e {
				if addend > 0 {
					if err := img.l2DependsOnRefcounts(); err != nil {
						return err
					}
				}
				lay.WriteL2Entry(t.data, j, n)
				t.dirty = true
			}
		}
		c := int64(l2off >> lay.ClusterBits)
		if addend != 0 {
			if err := img.addSnapshotRefs(c, 1, addend); err != nil {
				return err
			}
		}
		rc, err := img.Refcount(c)
		if err != nil {
			return err
		}
		e := l2off
		if rc == 1 {
			e |= OflagCopied
		}
		if e != old {
			l1[i] = e
			l1Modified = true
		}
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	if addend >= 0 && l1Modified {
		return img.writeSync(encodeTable(l1), l1Off)
	}
	return nil
}

// addSnapshotRefs adds addend (1 or -1) references to clusters [c, c+n).
// Freed clusters are discarded (QEMU's discard-snapshot default). A
// refcount at its maximum fails with EINVAL, as in QEMU's update_refcount.
func (img *Image) addSnapshotRefs(c, n, addend int64) error {
	if addend < 0 {
		return img.freeClusters(c, n, true)
	}
	maxRef := MaxRefcount(img.lay.RefcountOrder)
	for i := c; i < c+n; i++ {
		rc, err := img.Refcount(i)
		if err != nil {
			return err
		}
		if rc >= maxRef {
			return fmt.Errorf("%s: refcount of cluster %#x is at its %d-bit maximum: %w",
				img.file.Name(), i<<img.lay.ClusterBits, img.lay.RefcountBits, formats.ErrnoError{Err: syscall.EINVAL})
		}
	}
	return img.updateRefcounts(c, n, addend)
}

// checkOverlapExcept is qcow2_pre_write_overlap_check ignoring one kind
// of structure (the one being rewritten in place).
func (img *Image) checkOverlapExcept(off, n uint64, ignore string) error {
	if name := img.metadataAt(off, n); name != "" && name != ignore {
		return img.markCorrupt("Preventing invalid write on metadata (overlaps with %s)", name)
	}
	return nil
}

// withErrno words an error as QEMU's error_setg_errno: msg, then the
// strerror of the cause's errno (EIO when it has none). The cause stays
// reachable through errors.Is/As.
func withErrno(msg string, err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = syscall.EIO
	}
	return &formats.Error{Msg: msg + ": " + formats.ErrnoError{Err: errno}.Error(), Kind: err}
}

// encodeTable encodes a table of 64-bit entries big-endian.
func encodeTable(t []uint64) []byte {
	buf := make([]byte, len(t)*8)
	for i, e := range t {
		binary.BigEndian.PutUint64(buf[8*i:], e)
	}
	return buf
}

// OpenSnapshot returns a read-only view of the guest data as of the
// snapshot with that ID and name ("" matches any), as
// qcow2_snapshot_load_tmp: reads go through the snapshot's L1 table, the
// virtual size stays the image's, and unallocated ranges read from the
// backing image. The view shares the open image and its caches; it must
// be closed before the image, and the snapshot must not be deleted
// while it is open.
func (img *Image) OpenSnapshot(id, name string) (formats.Image, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	i := img.findSnapshot(id, name)
	if i < 0 {
		return nil, fmt.Errorf("Can't find snapshot: %w", snapshotNotFound(id+"/"+name))
	}
	sn := img.snapshots[i]
	l1, err := img.readSnapshotL1(&sn)
	if err != nil {
		return nil, err
	}
	if l1 == nil {
		// A nil table means the active one to lookupIn.
		l1 = []uint64{}
	}
	return &snapshotView{img: img, l1: l1}, nil
}

// snapshotView is an internal snapshot opened read-only. It is safe for
// concurrent use: l1 never changes, and the image's locks guard the rest.
type snapshotView struct {
	img *Image
	l1  []uint64
}

var (
	_ formats.Image  = (*snapshotView)(nil)
	_ formats.Backed = (*snapshotView)(nil)
)

func (v *snapshotView) ReadAt(p []byte, off int64) (int, error) { return v.img.readAtIn(v.l1, p, off) }

func (v *snapshotView) WriteAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("%s: snapshot: %w", v.img.file.Name(), formats.ErrReadOnly)
}

func (v *snapshotView) Size() int64 { return v.img.Size() }

func (v *snapshotView) BlockStatus(off, length int64) (formats.Extent, error) {
	return v.img.blockStatusIn(v.l1, off, length)
}

func (v *snapshotView) Flush() error     { return nil }
func (v *snapshotView) Close() error     { return nil }
func (v *snapshotView) Format() string   { return v.img.Format() }
func (v *snapshotView) Filename() string { return v.img.Filename() }

func (v *snapshotView) Backing() formats.Image { return v.img.Backing() }

func (v *snapshotView) BackingInfo() (name, format string) { return v.img.BackingInfo() }
