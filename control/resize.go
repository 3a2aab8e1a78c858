package control

import (
	"errors"

	"github.com/imgfs/imgfs/formats"
)

// MaxImageLength is BDRV_MAX_LENGTH, the largest size QEMU's block
// layer lets an image have: INT64_MAX rounded down to 1 GiB.
const MaxImageLength = (1<<63 - 1) &^ (1<<30 - 1)

// ResizeSize is the size operand of `resize`: an absolute size, or a
// change of the current one ("+1G", "-512M").
type ResizeSize struct {
	// Sign is +1 or -1 for a relative size, 0 for an absolute one.
	Sign int
	// N is the number of bytes; like QEMU's it is read as unsigned and
	// used as signed, so sizes of 2^63 and more come out negative.
	N int64
}

// ParseResizeSize reads the size operand as img_resize does: an
// optional sign, then a QemuOpts size.
func ParseResizeSize(arg string) (ResizeSize, error) {
	var s ResizeSize
	switch {
	case len(arg) > 0 && arg[0] == '+':
		s.Sign, arg = 1, arg[1:]
	case len(arg) > 0 && arg[0] == '-':
		s.Sign, arg = -1, arg[1:]
	}
	opts := formats.NewOptions([]formats.OptionSpec{{Name: "size", Type: formats.OptSize}})
	if err := opts.Set("size", arg); err != nil {
		return ResizeSize{}, err
	}
	n, _ := opts.Uint("size")
	s.N = int64(n)
	return s, nil
}

// ResizeOptions are the inputs of `resize` (qemu-img.c img_resize).
type ResizeOptions struct {
	Image formats.Image
	Size  ResizeSize
	// Prealloc is --preallocation; "" means off.
	Prealloc string
	// Shrink is --shrink: without it, making the image smaller fails
	// with ErrShrinkRefused.
	Shrink bool
}

// ErrShrinkRefused: the new size is smaller and --shrink was not given.
// qemu-img 7.2 follows this message with ShrinkWarning.
var ErrShrinkRefused = errors.New("Use the --shrink option to perform a shrink operation.")

// ShrinkWarning is what qemu-img warns when it refuses to shrink.
const ShrinkWarning = "Shrinking an image will delete all data beyond the shrunken image's end. " +
	"Before performing such an operation, make sure there is no important data there."

// ValidPrealloc reports whether mode is one of QAPI's PreallocMode
// names, which img_resize checks while reading its options.
func ValidPrealloc(mode string) bool {
	switch mode {
	case "off", "metadata", "falloc", "full":
		return true
	}
	return false
}

// Resize computes the new size and changes the image to it, with
// img_resize's checks and messages.
func Resize(o ResizeOptions) error {
	r, ok := o.Image.(formats.Resizer)
	if !ok {
		return formats.Errorf(formats.ErrUnsupported, "Image format driver does not support resize")
	}
	cur := o.Image.Size()
	total := o.Size.N
	if o.Size.Sign != 0 {
		// Wraps like QEMU's int64 arithmetic.
		total = cur + o.Size.N*int64(o.Size.Sign)
	}
	prealloc := o.Prealloc
	if prealloc == "" {
		prealloc = "off"
	}
	switch {
	case total <= 0:
		return formats.Errorf(ErrInvalidArgument, "New image size must be positive")
	case total <= cur && prealloc != "off":
		return formats.Errorf(ErrInvalidArgument, "Preallocation can only be used for growing images")
	case total < cur && !o.Shrink:
		return ErrShrinkRefused
	case total > MaxImageLength:
		return formats.Errorf(ErrInvalidArgument, "offset(%d) exceeds maximum(%d)", total, int64(MaxImageLength))
	}
	return r.Resize(total, prealloc, o.Shrink)
}
