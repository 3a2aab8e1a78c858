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

// CopyBitmaps is convert --bitmaps (convert_copy_bitmaps): every
// persistent bitmap of src is created in dst with its granularity and
// state, and its bits merged in. Inconsistent bitmaps fail the copy
// unless skipBroken.
func CopyBitmaps(src, dst formats.Image, skipBroken bool) error {
	s, ok := src.(formats.Bitmapper)
	if !ok {
		return nil
	}
	list, err := s.Bitmaps()
	if err != nil {
		return err
	}
	d, ok := dst.(formats.Bitmapper)
	if !ok && len(list) > 0 {
		return errNoPersistentBitmaps()
	}
	for _, bm := range list {
		if bm.InUse {
			if skipBroken {
				continue
			}
			return formats.Errorf(formats.ErrInvalidOption, "Cannot copy inconsistent bitmap '%s'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it", bm.Name)
		}
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
