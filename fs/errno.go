package fs

import (
	"context"
	"errors"
	"syscall"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// errOutside tags a refusal to open a file that a backing chain or a
// data file reference places outside SOURCE.
var errOutside = errors.New("path leaves the mounted directory")

// Errno is the one place where errors become the errno a FUSE request
// fails with. formats' sentinels come first because drivers wrap system
// errors in them (a lock conflict carries no errno of its own); a bare
// system error keeps its errno; anything else is an I/O error. The
// table, as README documents it for ctl:
//
//	EROFS       the image is read-only in the mount (-o ro, a backing
//	            image of another image, a read-only format)
//	EBUSY       another process holds the image's lock; the image or
//	            a snapshot of it is open in the mount (commit, rebase)
//	EACCES      a path outside SOURCE; no passphrase for the image
//	EIO         a damaged image, or an I/O error
//	EOPNOTSUPP  the format cannot do it (resize, snapshots, amend, check)
//	EINVAL      a malformed command line, a bad option or argument
//	ENOENT      no such snapshot, backing file or other named file
//	ENOSPC      no room (a backing name the header cannot hold, a
//	            write past the end of disk, a full host filesystem)
//	EINTR       the caller gave up (the request was interrupted)
func Errno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, formats.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, formats.ErrLocked):
		// Another process (a VM) uses the image: "Device or resource busy".
		return syscall.EBUSY
	case errors.Is(err, errOutside), errors.Is(err, errNoKey):
		return syscall.EACCES
	case errors.Is(err, formats.ErrCorrupt), errors.Is(err, formats.ErrWrongFormat):
		return syscall.EIO
	case errors.Is(err, formats.ErrUnsupported), errors.Is(err, control.ErrCheckUnsupported):
		return syscall.EOPNOTSUPP
	case errors.Is(err, formats.ErrInvalidOption), errors.Is(err, errUsage), errors.Is(err, control.ErrShrinkRefused),
		errors.Is(err, control.ErrInvalidArgument):
		return syscall.EINVAL
	case errors.Is(err, formats.ErrSnapshotNotFound):
		return syscall.ENOENT
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return errno
	}
	return syscall.EIO
}
