package control

import (
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// BitmapAction is one action of `bitmap`, applied in command-line order.
type BitmapAction struct {
	// Op is "add", "remove", "clear", "enable", "disable" or "merge".
	Op string
	// Source names the bitmap merged from (merge only).
	Source string
}

// BitmapOptions are the inputs of `bitmap` (qemu-img.c img_bitmap).
type BitmapOptions struct {
	Image   formats.Image
	Bitmap  string
	Actions []BitmapAction
	// Granularity is -g for add; 0 picks the driver's default.
	Granularity int64
	// Source is the image merged from (-b), or nil for Image itself.
	Source formats.Image
}

// Bitmap applies the actions in order and stops at the first failure,
// which reads "Operation OP on bitmap NAME failed: reason".
func Bitmap(o BitmapOptions) error {
	for _, a := range o.Actions {
		if err := bitmapAction(o, a); err != nil {
			return fmt.Errorf("Operation %s on bitmap %s failed: %w", a.Op, o.Bitmap, err)
		}
	}
	return nil
}

// errNoPersistentBitmaps is QEMU's answer for formats without them.
func errNoPersistentBitmaps() error {
	return formats.Errorf(formats.ErrUnsupported, "Can't store persistent bitmaps to %s: Operation not supported", formats.QEMUNodeName)
}

func bitmapAction(o BitmapOptions, a BitmapAction) error {
	b, ok := o.Image.(formats.Bitmapper)
	if !ok {
		if a.Op == "add" {
			return errNoPersistentBitmaps()
		}
		return formats.Errorf(formats.ErrInvalidOption, "Dirty bitmap '%s' not found", o.Bitmap)
	}
	switch a.Op {
	case "add":
		return b.AddBitmap(o.Bitmap, o.Granularity, false)
	case "remove":
		return b.RemoveBitmap(o.Bitmap)
	case "clear":
		return b.ClearBitmap(o.Bitmap)
	case "enable":
		return b.EnableBitmap(o.Bitmap)
	case "disable":
		return b.DisableBitmap(o.Bitmap)
	case "merge":
		return mergeBitmap(b, o, a.Source)
	}
	return fmt.Errorf("unknown bitmap action %q", a.Op)
}

// mergeBitmap looks up the destination before the source, as
// block_dirty_bitmap_merge does, so a missing one is named first.
func mergeBitmap(dst formats.Bitmapper, o BitmapOptions, source string) error {
	if _, err := findBitmap(dst, o.Bitmap); err != nil {
		return err
	}
	srcImg := o.Source
	if srcImg == nil {
		srcImg = o.Image
	}
	src, ok := srcImg.(formats.Bitmapper)
	if !ok {
		return formats.Errorf(formats.ErrInvalidOption, "Dirty bitmap '%s' not found", source)
	}
	data, err := src.BitmapData(source)
	if err != nil {
		return err
	}
	return dst.MergeBitmap(o.Bitmap, data)
}

func findBitmap(b formats.Bitmapper, name string) (formats.BitmapInfo, error) {
	list, err := b.Bitmaps()
	if err != nil {
		return formats.BitmapInfo{}, err
	}
	for _, i := range list {
		if i.Name == name {
			return i, nil
		}
	}
	return formats.BitmapInfo{}, formats.Errorf(formats.ErrInvalidOption, "Dirty bitmap '%s' not found", name)
}

// CheckCopyBitmaps is what img_convert checks for --bitmaps before it
// converts anything, in its order.
func CheckCopyBitmaps(sources []formats.Image, targetFormat string, skipBroken bool) error {
	if len(sources) > 1 {
		return formats.Errorf(formats.ErrInvalidOption, "Copying bitmaps only possible with single source")
	}
	s, ok := sources[0].(formats.Bitmapper)
	if !ok {
		return formats.Errorf(formats.ErrUnsupported, "Source lacks bitmap support")
	}
	if !skipBroken {
		if _, err := bitmapsToCopy(s, false, nil); err != nil {
			return err
		}
	}
	if targetFormat == "" {
		targetFormat = "raw"
	}
	// qcow2 is the only format with persistent bitmaps.
	if targetFormat != "qcow2" {
		return formats.Errorf(formats.ErrUnsupported, "Format driver '%s' does not support bitmaps", targetFormat)
	}
	return nil
}

// bitmapsToCopy lists the bitmaps of s that convert copies, in
// directory order. QEMU looks at them in reverse directory order (its
// list of loaded bitmaps is built by prepending), which decides which
// inconsistent bitmap the error names and the order of the warnings.
func bitmapsToCopy(s formats.Bitmapper, skipBroken bool, warn func(string)) ([]formats.BitmapInfo, error) {
	list, err := s.Bitmaps()
	if err != nil {
		return nil, err
	}
	skip := make([]bool, len(list))
	for i := len(list) - 1; i >= 0; i-- {
		if !list[i].InUse {
			continue
		}
		if !skipBroken {
			return nil, formats.Errorf(formats.ErrInvalidOption, "Cannot copy inconsistent bitmap '%s'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it", list[i].Name)
		}
		warn(fmt.Sprintf("Skipping inconsistent bitmap '%s'", list[i].Name))
		skip[i] = true
	}
	var out []formats.BitmapInfo
	for i, bm := range list {
		if !skip[i] {
			out = append(out, bm)
		}
	}
	return out, nil
}

// CopyBitmaps is convert --bitmaps (convert_copy_bitmaps): every
// persistent bitmap of src is created in dst with its granularity and
// state, in the source's directory order (QEMU creates them in reverse
// and stores its list reversed again), and its bits merged in.
func CopyBitmaps(src, dst formats.Image, skipBroken bool, warn func(string)) error {
	s, ok := src.(formats.Bitmapper)
	if !ok {
		return nil
	}
	list, err := bitmapsToCopy(s, skipBroken, warn)
	if err != nil {
		return err
	}
	d, ok := dst.(formats.Bitmapper)
	if !ok && len(list) > 0 {
		return errNoPersistentBitmaps()
	}
	for _, bm := range list {
		if err := d.AddBitmap(bm.Name, bm.Granularity, !bm.Enabled); err != nil {
			return err
		}
		data, err := s.BitmapData(bm.Name)
		if err != nil {
			return err
		}
		if err := d.MergeBitmap(bm.Name, data); err != nil {
			return err
		}
	}
	return nil
}
