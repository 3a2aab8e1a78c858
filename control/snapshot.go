package control

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/imgfs/imgfs/formats"
)

// SnapshotAction is what `snapshot` does: one of -l, -a, -c, -d.
type SnapshotAction int

const (
	// SnapshotNone: no action given; qemu-img opens the image and does
	// nothing.
	SnapshotNone SnapshotAction = iota
	SnapshotList
	SnapshotApply
	SnapshotCreate
	SnapshotDelete
)

// snapshotNameMax is the size of QEMUSnapshotInfo.name less its NUL:
// qemu-img stores at most this many bytes of a new snapshot's name.
const snapshotNameMax = 255

// SnapshotOptions are the inputs of `snapshot` (qemu-img.c img_snapshot).
type SnapshotOptions struct {
	Image  formats.Image
	Action SnapshotAction
	// Name is the snapshot argument of -a, -c or -d.
	Name string
	// Now is the clock for the date of a new snapshot; nil means
	// time.Now.
	Now func() time.Time
}

// SnapshotResult is what -l lists; it is empty for the other actions.
type SnapshotResult struct {
	Snapshots []formats.Snapshot
}

// Human renders the list as dump_snapshots does: nothing at all without
// snapshots, else a title and bdrv_snapshot_dump's table.
func (r *SnapshotResult) Human() string {
	if len(r.Snapshots) == 0 {
		return ""
	}
	return "Snapshot list:\n" + SnapshotTable(r.Snapshots)
}

// errNoSnapshotSupport is bdrv_snapshot_goto's message for drivers
// without snapshots.
var errNoSnapshotSupport = formats.Errorf(formats.ErrUnsupported, "Block driver does not support snapshots")

// Snapshot lists, applies, creates or deletes an internal snapshot with
// qemu-img 7.2's messages ("Could not apply snapshot 'x': ...").
func Snapshot(o SnapshotOptions) (*SnapshotResult, error) {
	sn, _ := o.Image.(formats.Snapshotter)
	switch o.Action {
	case SnapshotList:
		if sn == nil {
			return &SnapshotResult{}, nil
		}
		// bdrv_snapshot_list failing prints nothing, as no snapshots.
		list, err := sn.Snapshots()
		if err != nil {
			return &SnapshotResult{}, nil
		}
		return &SnapshotResult{Snapshots: list}, nil
	case SnapshotCreate:
		var err error = syscall.ENOTSUP
		if sn != nil {
			err = sn.CreateSnapshot(newSnapshot(o.Name, o.Now))
		}
		if err != nil {
			errno := errnoOf(err)
			return nil, formats.Errorf(errno, "Could not create snapshot '%s': %d (%s)", o.Name, -int(errno), formats.ErrnoError{Err: errno})
		}
	case SnapshotApply:
		err := errNoSnapshotSupport
		if sn != nil {
			if err = sn.ApplySnapshot(o.Name); err != nil {
				errno := errnoOf(err)
				err = formats.Errorf(errno, "Failed to load snapshot: %s", formats.ErrnoError{Err: errno})
			}
		}
		if err != nil {
			return nil, fmt.Errorf("Could not apply snapshot '%s': %w", o.Name, err)
		}
	case SnapshotDelete:
		// bdrv_snapshot_find looks the name up, then the snapshot with
		// that ID and name is deleted.
		var list []formats.Snapshot
		if sn != nil {
			list, _ = sn.Snapshots()
		}
		i := findSnapshotByName(list, o.Name)
		if i < 0 {
			return nil, formats.Errorf(formats.ErrSnapshotNotFound, "Could not delete snapshot '%s': snapshot not found", o.Name)
		}
		if err := sn.DeleteSnapshot(list[i].ID, list[i].Name); err != nil {
			return nil, fmt.Errorf("Could not delete snapshot '%s': %w", o.Name, err)
		}
	}
	return &SnapshotResult{}, nil
}

// newSnapshot is the snapshot qemu-img -c takes: the name cut to what
// QEMU's structure holds, the wall clock to the microsecond, no VM state.
func newSnapshot(name string, now func() time.Time) formats.Snapshot {
	if now == nil {
		now = time.Now
	}
	if len(name) > snapshotNameMax {
		name = name[:snapshotNameMax]
	}
	us := now().UnixMicro()
	return formats.Snapshot{
		Name:      name,
		DateSec:   uint32(us / 1e6),
		DateNsec:  uint32(us % 1e6 * 1000),
		HasICount: true, // zero, as qemu-img's zeroed QEMUSnapshotInfo
	}
}

func findSnapshotByName(list []formats.Snapshot, name string) int {
	for i, s := range list {
		if s.Name == name {
			return i
		}
	}
	return -1
}

// errnoOf is the errno QEMU would return for err: the one it carries,
// or one that matches its kind, EIO otherwise.
func errnoOf(err error) syscall.Errno {
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		return errno
	case errors.Is(err, formats.ErrSnapshotNotFound):
		return syscall.ENOENT
	case errors.Is(err, formats.ErrUnsupported):
		return syscall.ENOTSUP
	case errors.Is(err, formats.ErrInvalidOption):
		return syscall.EINVAL
	case errors.Is(err, formats.ErrReadOnly):
		return syscall.EACCES
	}
	return syscall.EIO
}

// SnapshotParam is the -l argument of convert and measure: either
// "snapshot.id=ID,snapshot.name=NAME" (either part may be missing) or
// one string that is tried as an ID, then as a name.
type SnapshotParam struct {
	ID, Name string
	// IDOrName is set for the short form.
	IDOrName string
}

// OpenSnapshot opens the snapshot p of img read-only, as qemu-img's
// convert and measure load it (bdrv_snapshot_load_tmp, or
// bdrv_snapshot_load_tmp_by_id_or_name for the short form). Errors are
// qemu-img's "Failed to load snapshot: ..." messages. The returned
// image must be closed before img.
func OpenSnapshot(img formats.Image, p SnapshotParam) (formats.Image, error) {
	sn, ok := img.(formats.Snapshotter)
	if !ok {
		return nil, fmt.Errorf("Failed to load snapshot: Block format '%s' used by device '' does not support temporarily loading internal snapshots", img.Format())
	}
	var view formats.Image
	var err error
	if p.IDOrName != "" {
		view, err = sn.OpenSnapshot(p.IDOrName, "")
		if errors.Is(err, formats.ErrSnapshotNotFound) {
			view, err = sn.OpenSnapshot("", p.IDOrName)
		}
	} else {
		view, err = sn.OpenSnapshot(p.ID, p.Name)
	}
	if errors.Is(err, formats.ErrSnapshotNotFound) {
		return nil, errors.New("Failed to load snapshot: Can't find snapshot")
	}
	if err != nil {
		return nil, fmt.Errorf("Failed to load snapshot: %v", err)
	}
	return view, nil
}
