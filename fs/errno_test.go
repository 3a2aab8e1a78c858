package fs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func TestErrno(t *testing.T) {
	_, statErr := os.Stat("/nonexistent/imgfs")
	tests := []struct {
		name string
		err  error
		want syscall.Errno
	}{
		{"nil", nil, 0},
		{"read-only", fmt.Errorf("x: %w", formats.ErrReadOnly), syscall.EROFS},
		{"locked", &formats.LockError{Perm: formats.PermWrite, Name: "a"}, syscall.EBUSY},
		{"corrupt", formats.Errorf(formats.ErrCorrupt, "L1 table is too small"), syscall.EIO},
		{"unsupported", fmt.Errorf("y: %w", formats.ErrUnsupported), syscall.EOPNOTSUPP},
		{"check unsupported", control.ErrCheckUnsupported, syscall.EOPNOTSUPP},
		{"invalid option", formats.Errorf(formats.ErrInvalidOption, "The new size must be a multiple of 512"), syscall.EINVAL},
		{"outside", formats.Errorf(errOutside, "backing file is outside"), syscall.EACCES},
		{"os error", statErr, syscall.ENOENT},
		{"wrapped errno", fmt.Errorf("Could not open 'x': %w", formats.ErrnoError{Err: syscall.EACCES}), syscall.EACCES},
		{"invalid argument", formats.Errorf(control.ErrInvalidArgument, "New image size must be positive"), syscall.EINVAL},
		{"no snapshot", formats.Errorf(formats.ErrSnapshotNotFound, "Could not delete snapshot 'x': snapshot not found"), syscall.ENOENT},
		{"errno kind", formats.Errorf(syscall.EEXIST, "Could not create snapshot 'x': -17 (File exists)"), syscall.EEXIST},
		{"no space", formats.Errorf(syscall.ENOSPC, "No space left in the file header"), syscall.ENOSPC},
		{"no key", formats.Errorf(errNoKey, "Invalid password, cannot unlock any keyslot"), syscall.EACCES},
		{"canceled", context.Canceled, syscall.EINTR},
		{"other", errors.New("something"), syscall.EIO},
	}
	for _, tt := range tests {
		if got := Errno(tt.err); got != tt.want {
			t.Errorf("%s: Errno(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}
