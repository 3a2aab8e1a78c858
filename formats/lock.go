package formats

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Image locking compatible with QEMU's file-posix driver (block/file-posix.c,
// raw_apply_lock_bytes and raw_check_lock_bytes), so that imgfs and a
// running QEMU refuse to write the same image.
//
// QEMU takes a shared (read) open-file-description lock on one byte per
// permission: byte 100+i says "I hold permission i", byte 200+i says "I do
// not let anyone else have permission i". Conflicts are found by testing
// those bytes for other holders, never by taking exclusive locks. OFD locks
// belong to the open file description, so they survive other descriptors
// of the same file being closed (classic POSIX locks would not) and go away
// with the last descriptor of this one.

// Perm is a set of QEMU block-layer permissions (BLK_PERM_*).
type Perm uint8

const (
	// PermConsistentRead: reads see consistent data (nobody else changes
	// it behind the holder's back).
	PermConsistentRead Perm = 1 << iota
	// PermWrite: the holder changes the data.
	PermWrite
	// PermWriteUnchanged: the holder writes data that does not change
	// what a reader sees (copy-on-read).
	PermWriteUnchanged
	// PermResize: the holder changes the file size.
	PermResize

	// PermAll is every permission QEMU 7.2 knows (BLK_PERM_ALL). QEMU up
	// to 6.1 also had "change children" on bytes 104/204; nobody tests or
	// holds those any more.
	PermAll = PermConsistentRead | PermWrite | PermWriteUnchanged | PermResize
)

const (
	lockPermBase   = 100 // RAW_LOCK_PERM_BASE
	lockSharedBase = 200 // RAW_LOCK_SHARED_BASE
)

// permNames are bdrv_perm_names' words, in bit order.
var permNames = [...]string{"consistent read", "write", "write unchanged", "resize"}

// String names the permissions as QEMU's messages do: "write, resize".
func (p Perm) String() string {
	var names []string
	for i, n := range permNames {
		if p&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, ", ")
}

// Access says how an image's file is used; Perms turns it into the
// permissions qemu-img and qemu-io 7.2 take for the same use (their
// BlockBackend's permissions pushed down through the format driver, see
// bdrv_default_perms_for_storage in block.c).
type Access struct {
	// NoIO: only the image's metadata is read (qemu-img info opens with
	// BDRV_O_NO_IO and takes no consistent-read permission).
	NoIO bool
	// Write: the image is opened read-write.
	Write bool
	// Resize: the user resizes the image (qemu-img resize).
	Resize bool
	// Metadata: the file holds format metadata, i.e. the format is
	// anything but raw. Such a file cannot be shared with writers or
	// resizers, and writing guest data may write and grow it.
	Metadata bool
	// ForceShare (-U) lets everyone else have every permission. QEMU
	// allows it only for read-only opens; Perms does not check that.
	ForceShare bool
}

// Perms is what an open file asks for: the permissions it holds and the
// ones it lets others have (QEMU's perm and shared_perm).
type Perms struct {
	Hold, Share Perm
}

// Perms returns the permissions qemu-img would hold and share for a.
//
// Observed with strace on qemu-img 7.2: raw read-only holds byte 100,
// raw read-write 100 and 101; qcow2 read-only holds 100, 201 and 203,
// qcow2 read-write 100, 101, 103, 201, 203; info on qcow2 holds 201 and 203
// and on raw nothing; -U drops every 2xx byte.
func (a Access) Perms() Perms {
	var perm Perm
	if !a.NoIO {
		perm |= PermConsistentRead
	}
	if a.Write {
		perm |= PermWrite
	}
	if a.Resize {
		perm |= PermResize
	}
	shared := PermAll
	if a.Metadata {
		if a.Write {
			perm |= PermWrite | PermResize
		}
		shared &^= PermWrite | PermResize
	}
	if a.ForceShare {
		shared = PermAll
	}
	return Perms{Hold: perm, Share: shared}
}

// ErrLocked: another process holds a lock that conflicts with the access
// asked for. errors.Is(err, ErrLocked) holds for a conflict *LockError.
var ErrLocked = errors.New("image is locked by another process")

// LockError is a lock conflict, worded as QEMU words it:
//
//	Failed to get shared "write" lock
//	Is another process using the image [disk.qcow2]?
type LockError struct {
	// Perm is the permission that could not be had.
	Perm Perm
	// Shared: another process holds Perm, which this one wanted to deny
	// to others ("shared" lock); otherwise another process denies Perm,
	// which this one wanted to hold.
	Shared bool
	// Name is the file name the image was opened by.
	Name string
	// Err is the system error when testing the lock failed for a reason
	// other than a conflict; nil for a conflict.
	Err error
}

func (e *LockError) Error() string {
	msg := fmt.Sprintf("Failed to get \"%s\" lock", e.Perm)
	if e.Shared {
		msg = fmt.Sprintf("Failed to get shared \"%s\" lock", e.Perm)
	}
	if e.Err != nil {
		msg += ": " + ErrnoError{e.Err}.Error()
	}
	return msg + "\nIs another process using the image [" + e.Name + "]?"
}

// Is makes errors.Is(err, ErrLocked) true for conflicts.
func (e *LockError) Is(target error) bool { return target == ErrLocked && e.Err == nil }

func (e *LockError) Unwrap() error { return e.Err }

// ImageLock is the set of lock bytes one File holds. It is safe for
// concurrent use.
type ImageLock struct {
	f *File

	mu sync.Mutex // guards perm and shared, and serialises lock changes
	// held is what the bytes currently locked express: bytes 100+i for
	// held.Hold, 200+i for the complement of held.Share.
	held Perms
}

// LockFile locks f for p, as QEMU does when it opens an image: it first
// takes its own bytes, then checks that no other open file holds a byte
// that conflicts, and on a conflict drops what it took and returns a
// *LockError.
//
// The locks last until Release, or until f is closed.
func LockFile(f *File, p Perms) (*ImageLock, error) {
	l := &ImageLock{f: f, held: Perms{Share: PermAll}}
	f.locked = true
	if err := l.Update(p); err != nil {
		return nil, err
	}
	return l, nil
}

// Update changes the permissions, e.g. when an image opened read-only is
// reopened read-write for commit. On failure the previous locks stay as
// they were.
func (l *ImageLock) Update(p Perms) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	old := l.held
	// Take the union of the old and new bytes first so that no other
	// process can slip in between; then check; then drop what is no
	// longer needed (raw_handle_perm_lock's prepare and commit).
	err := l.apply(Perms{Hold: old.Hold | p.Hold, Share: old.Share & p.Share})
	if err == nil {
		err = l.check(p)
	}
	if err != nil {
		l.apply(old)
		return err
	}
	return l.apply(p)
}

// Release drops every lock byte.
func (l *ImageLock) Release() error {
	return l.Update(Perms{Share: PermAll})
}

// apply makes the locked bytes express exactly p, and records what it
// managed to lock.
func (l *ImageLock) apply(p Perms) error {
	fd := l.f.Fd()
	for i := range len(permNames) {
		bit := Perm(1) << i
		if err := setLockByte(fd, lockPermBase+int64(i), p.Hold&bit != 0, l.held.Hold&bit != 0); err != nil {
			return err
		}
		l.held.Hold = l.held.Hold&^bit | p.Hold&bit
		if err := setLockByte(fd, lockSharedBase+int64(i), p.Share&bit == 0, l.held.Share&bit == 0); err != nil {
			return err
		}
		l.held.Share = l.held.Share&^bit | p.Share&bit
	}
	return nil
}

// setLockByte locks or unlocks byte off when its state has to change.
func setLockByte(fd uintptr, off int64, want, have bool) error {
	if want == have {
		return nil
	}
	lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: off, Len: 1}
	if want {
		lk.Type = unix.F_RDLCK
	}
	if err := unix.FcntlFlock(fd, unix.F_OFD_SETLK, &lk); err != nil {
		if want {
			return fmt.Errorf("Failed to lock byte %d: %w", off, ErrnoError{err})
		}
		return fmt.Errorf("Failed to unlock byte %d: %w", off, ErrnoError{err})
	}
	return nil
}

// unlockAll drops every lock byte the open file description holds.
func unlockAll(fd uintptr) {
	lk := unix.Flock_t{Type: unix.F_UNLCK, Start: lockPermBase, Len: lockSharedBase + int64(len(permNames)) - lockPermBase}
	unix.FcntlFlock(fd, unix.F_OFD_SETLK, &lk)
}

// check tests, as raw_check_lock_bytes does, first that nobody else
// denies a permission p holds (byte 200+i), then that nobody else holds a
// permission p does not share (byte 100+i).
func (l *ImageLock) check(p Perms) error {
	for i := range len(permNames) {
		if bit := Perm(1) << i; p.Hold&bit != 0 {
			if err := l.conflict(lockSharedBase+int64(i), bit, false); err != nil {
				return err
			}
		}
	}
	for i := range len(permNames) {
		if bit := Perm(1) << i; p.Share&bit == 0 {
			if err := l.conflict(lockPermBase+int64(i), bit, true); err != nil {
				return err
			}
		}
	}
	return nil
}

// conflict returns a *LockError when another process holds byte off,
// which stands for permission bit.
func (l *ImageLock) conflict(off int64, bit Perm, shared bool) error {
	held, err := lockByteHeld(l.f.Fd(), off)
	if held || err != nil {
		return &LockError{Perm: bit, Shared: shared, Name: l.f.Name(), Err: err}
	}
	return nil
}

// lockByteHeld reports whether another open file description holds a
// lock on byte off.
func lockByteHeld(fd uintptr, off int64) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(fd, unix.F_OFD_GETLK, &lk); err != nil {
		return false, err
	}
	return lk.Type != unix.F_UNLCK, nil
}
