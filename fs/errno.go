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
// system error keeps its errno; anything else is an I/O error.
func Errno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, formats.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, formats.ErrLocked):
		// Another process (a VM) uses the image: "Device or resource busy".
		return syscall.EBUSY
	case errors.Is(err, errOutside):
		return syscall.EACCES
	case errors.Is(err, formats.ErrCorrupt), errors.Is(err, formats.ErrWrongFormat):
		return syscall.EIO
	case errors.Is(err, formats.ErrUnsupported), errors.Is(err, control.ErrCheckUnsupported):
		return syscall.EOPNOTSUPP
	case errors.Is(err, formats.ErrInvalidOption), errors.Is(err, errUsage), errors.Is(err, control.ErrShrinkRefused):
		return syscall.EINVAL
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return errno
	}
	return syscall.EIO
}
