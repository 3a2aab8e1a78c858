package control

import (
	"fmt"
	"strconv"

	"github.com/imgfs/imgfs/formats"
)

// MeasureOptions are the inputs of `measure` (qemu-img.c img_measure).
type MeasureOptions struct {
	// Format is -O, the format of the image to measure for; "" is raw.
	Format string
	// Options is the -o list, several -o joined by ','.
	Options string
	// Secrets holds the --object secrets by id, for options that name
	// one (luks' key-secret).
	Secrets map[string][]byte
	// Size is --size; negative when not given.
	Size int64
	// Source is the image whose content is measured; nil with Size.
	Source formats.Image
}

// OptionsError is a bad -o list. qemu-img reports the parse error and
// then, as a second message, that the options do not suit the format.
type OptionsError struct {
	Format string
	Err    error
}

func (e *OptionsError) Error() string {
	return fmt.Sprintf("%v\nInvalid options for file format '%s'", e.Err, e.Format)
}

func (e *OptionsError) Unwrap() error { return e.Err }

// MeasureReport is the result of `measure`.
type MeasureReport struct{ formats.MeasureResult }

// Measure checks the target format and its options in img_measure's
// order and asks the format driver for the sizes.
func Measure(o MeasureOptions) (*MeasureReport, error) {
	format := o.Format
	if format == "" {
		format = "raw"
	}
	d := formats.Lookup(format)
	if d == nil {
		return nil, fmt.Errorf("Unknown file format '%s'", format)
	}
	if d.Create == nil || d.ReadOnly {
		return nil, fmt.Errorf("Format driver '%s' does not support image creation", format)
	}
	opts := formats.NewOptions(d.CreateSpecs())
	opts.Secrets = o.Secrets
	if o.Options != "" {
		if err := opts.Parse(o.Options); err != nil {
			return nil, &OptionsError{Format: format, Err: err}
		}
	}
	if o.Size >= 0 {
		if err := opts.Set("size", strconv.FormatInt(o.Size, 10)); err != nil {
			return nil, err
		}
	}
	if d.Measure == nil {
		return nil, fmt.Errorf("Block driver '%s' does not support size measurement", format)
	}
	res, err := d.Measure(opts, o.Source)
	if err != nil {
		return nil, err
	}
	return &MeasureReport{*res}, nil
}

// Object is the report as QAPI's BlockMeasureInfo.
func (r *MeasureReport) Object() formats.Object {
	o := formats.Object{
		{Key: "required", Value: r.Required},
		{Key: "fully-allocated", Value: r.FullyAllocated},
	}
	if r.HasBitmaps {
		o = append(o, formats.Member{Key: "bitmaps", Value: r.Bitmaps})
	}
	return o
}

// JSON renders the report as `measure --output=json`.
func (r *MeasureReport) JSON() string { return MarshalQJSON(r.Object()) + "\n" }

// Human renders the report as img_measure's human output.
func (r *MeasureReport) Human() string {
	s := fmt.Sprintf("required size: %d\nfully allocated size: %d\n", r.Required, r.FullyAllocated)
	if r.HasBitmaps {
		s += fmt.Sprintf("bitmaps size: %d\n", r.Bitmaps)
	}
	return s
}
