package formats

import (
	"errors"
	"fmt"
)

// Sentinel errors. Drivers wrap them with %w and the offsets and values
// that explain them.
var (
	// ErrWrongFormat: the file is not an image of this driver's format.
	ErrWrongFormat = errors.New("image is not in this format")
	// ErrUnsupported: a valid image uses a feature imgfs does not support.
	ErrUnsupported = errors.New("unsupported")
	// ErrCorrupt: the image's metadata is inconsistent or out of bounds.
	ErrCorrupt = errors.New("image is corrupt")
	// ErrReadOnly: a write to an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrInvalidOption: a creation or open option has a bad name or value.
	ErrInvalidOption = errors.New("invalid option")
	// ErrSnapshotNotFound: no internal snapshot has the ID or name asked
	// for.
	ErrSnapshotNotFound = errors.New("snapshot not found")
)

// Error is an error whose text is exactly QEMU's message while it still
// matches a sentinel with errors.Is, for messages the command line must
// print verbatim.
type Error struct {
	Msg  string
	Kind error
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Kind }

// Errorf formats a QEMU-worded message and tags it with the sentinel kind.
func Errorf(kind error, format string, args ...any) error {
	return &Error{Msg: fmt.Sprintf(format, args...), Kind: kind}
}
