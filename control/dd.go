package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"

	"github.com/imgfs/imgfs/formats"
)

// DefaultDDBlockSize is dd's bs when none is given.
const DefaultDDBlockSize = 512

// ddChunk bounds the buffer dd copies with. qemu-img copies one bs-sized
// block at a time, but bs may be up to 2 GiB; since the output is written
// sequentially, the chunking does not change the result.
const ddChunk = 1 << 20

// DDOptions are the inputs of `dd` (qemu-img.c img_dd).
type DDOptions struct {
	// Source is the open input image; SourceName is the if= operand,
	// which the skip warning repeats.
	Source     formats.Image
	SourceName string
	// Target is the of= operand, created anew in TargetFormat ("" is raw).
	Target       string
	TargetFormat string
	// BlockSize is bs= (1..INT_MAX); Count and Skip are count= and
	// skip= in blocks, used when HasCount and HasSkip.
	BlockSize int64
	Count     int64
	HasCount  bool
	Skip      int64
	HasSkip   bool
	// OpenTarget opens the created target for writing; nil opens Target
	// with TargetFormat.
	OpenTarget func() (formats.Image, error)
	// Warn receives the warning about a skip past the end of the input.
	Warn func(msg string)
}

// DD creates the target and copies the input to it, as img_dd does:
// count= limits how far into the input dd reads, counted from its
// start (the skipped blocks included), and a skip past that end makes
// an empty target with a warning.
func DD(ctx context.Context, o DDOptions) error {
	format := o.TargetFormat
	if format == "" {
		format = "raw"
	}
	d := formats.Lookup(format)
	if d == nil {
		return errors.New("Unknown file format")
	}
	if d.Create == nil || d.ReadOnly {
		return fmt.Errorf("Format driver '%s' does not support image creation", format)
	}
	bs := o.BlockSize
	if bs <= 0 {
		bs = DefaultDDBlockSize
	}
	size := o.Source.Size()
	if o.HasCount && o.Count <= math.MaxInt64/bs && o.Count*bs < size {
		size = o.Count * bs
	}
	skipPast := o.HasSkip && (o.Skip > math.MaxInt64/bs || size < bs*o.Skip)
	inPos := int64(0)
	if o.HasSkip && !skipPast {
		inPos = bs * o.Skip
	}
	outSize := size - inPos
	if skipPast {
		outSize = 0
	}
	opts := formats.NewOptions(d.CreateSpecs())
	if err := opts.Set("size", strconv.FormatInt(outSize, 10)); err != nil {
		return err
	}
	if err := d.Create(o.Target, opts); err != nil {
		return fmt.Errorf("%s: error while creating output image: %w", o.Target, err)
	}
	open := o.OpenTarget
	if open == nil {
		open = func() (formats.Image, error) {
			img, err := formats.Open(o.Target, formats.OpenOptions{Format: format})
			if err != nil {
				return nil, fmt.Errorf("Could not open '%s': %w", o.Target, err)
			}
			return img, nil
		}
	}
	target, err := open()
	if err != nil {
		return err
	}
	if skipPast {
		if o.Warn != nil {
			o.Warn(fmt.Sprintf("%s: cannot skip to specified offset", o.SourceName))
		}
		inPos = size
	}
	err = ddCopy(ctx, o.Source, target, inPos, size)
	if err == nil {
		err = target.Flush()
	}
	if cerr := target.Close(); err == nil {
		err = cerr
	}
	return err
}

// ddCopy copies src's bytes [from, to) to the start of dst.
func ddCopy(ctx context.Context, src, dst formats.Image, from, to int64) error {
	if from >= to {
		return nil
	}
	buf := make([]byte, min(to-from, ddChunk))
	for in, out := from, int64(0); in < to; {
		if err := ctx.Err(); err != nil {
			return err
		}
		chunk := buf[:min(to-in, int64(len(buf)))]
		if n, err := src.ReadAt(chunk, in); err != nil && !(errors.Is(err, io.EOF) && n == len(chunk)) {
			return ioErrorf(err, "error while reading from input image file")
		}
		if _, err := dst.WriteAt(chunk, out); err != nil {
			return ioErrorf(err, "error while writing to output image file")
		}
		in += int64(len(chunk))
		out += int64(len(chunk))
	}
	return nil
}
