package control

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// MapOptions are the inputs of `qemu-img map`.
type MapOptions struct {
	Image formats.Image
	// Start is --start-offset; MaxLength is --max-length, negative when
	// not given.
	Start, MaxLength int64
	// Human selects the human output's merging rule (see MapEntries).
	Human bool
}

// MapEntry is one line of map's output: a run of guest bytes with one
// status, as QEMU's MapEntry.
type MapEntry struct {
	Start, Length int64
	Depth         int
	Present       bool
	Zero          bool
	Data          bool
	// Offset is the host offset in Filename, when HasOffset.
	Offset    int64
	HasOffset bool
	Filename  string
}

// MapResult is the output of map: the entries, and the error that ended
// the walk early (the entries before it are still printed).
type MapResult struct {
	Entries []MapEntry
	Err     error
	human   bool
}

// mapProbe is how far one block status query may reach, as img_map's
// "probe up to 1 GiB at a time".
const mapProbe = 1 << 30

// Map walks the image's block status through its backing chain and
// merges adjacent runs as img_map does.
func Map(ctx context.Context, o MapOptions) *MapResult {
	res := &MapResult{human: o.Human}
	length := o.Image.Size()
	if o.MaxLength >= 0 {
		length = min(o.Start+o.MaxLength, length)
	}
	curr := MapEntry{Start: o.Start}
	for curr.Start+curr.Length < length {
		if err := ctx.Err(); err != nil {
			res.Err = err
			return res
		}
		off := curr.Start + curr.Length
		ce, err := chainStatus(o.Image, off, min(mapProbe, length-off))
		if err != nil {
			res.Err = fmt.Errorf("Could not read file metadata: %w", err)
			return res
		}
		next := MapEntry{
			Start:   off,
			Length:  ce.Length,
			Depth:   ce.Depth,
			Present: ce.Present,
			Zero:    ce.Status&formats.StatusZero != 0,
			Data:    ce.Status&formats.StatusData != 0,
		}
		if ce.Status&formats.StatusOffsetValid != 0 {
			next.Offset, next.HasOffset, next.Filename = ce.Offset, true, ce.File
		}
		if curr.mergeable(&next) {
			curr.Length += next.Length
			continue
		}
		if curr.Length > 0 {
			res.Entries = append(res.Entries, curr)
			// The human format does not tell zero, unallocated and
			// zero data apart; img_map folds them into "zero" when it
			// prints the previous entry, which lets them merge further.
			if o.Human && (!next.Data || next.Zero) {
				next.Data, next.Zero = false, true
			}
		}
		curr = next
	}
	res.Entries = append(res.Entries, curr)
	return res
}

// chainStatus is formats.ChainStatus held to its contract: a run
// within [off, off+length) and not empty, so that a faulty driver cannot
// make a walk loop or overrun.
func chainStatus(img formats.Image, off, length int64) (formats.ChainExtent, error) {
	ce, err := formats.ChainStatus(img, off, length)
	if err != nil {
		return ce, err
	}
	if ce.Length <= 0 || ce.Length > length {
		return ce, fmt.Errorf("block status at %d returned %d bytes for %d: %w", off, ce.Length, length, formats.ErrCorrupt)
	}
	return ce, nil
}

// mergeable is img_map's entry_mergeable: same attributes and, for
// mapped runs, contiguous host offsets in the same file.
func (c *MapEntry) mergeable(n *MapEntry) bool {
	if c.Length == 0 {
		return false
	}
	if c.Zero != n.Zero || c.Data != n.Data || c.Depth != n.Depth || c.Present != n.Present ||
		c.HasOffset != n.HasOffset || c.Filename != n.Filename {
		return false
	}
	return !c.HasOffset || c.Offset+c.Length == n.Offset
}

// ErrMapUnmappable is the human map's refusal of data without a host
// offset.
var ErrMapUnmappable = errors.New("File contains external, encrypted or compressed clusters.")

// Human renders the map as qemu-img's human format: a header and one
// line per data run. It returns the text printed before an error, and
// the error.
func (r *MapResult) Human() (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	for _, e := range r.Entries {
		if e.Data && !e.HasOffset {
			return b.String(), ErrMapUnmappable
		}
		if e.Data && !e.Zero {
			fmt.Fprintf(&b, "%-16s%-16s%-16s%s\n", altHex(e.Start), altHex(e.Length), altHex(e.Offset), e.Filename)
		}
	}
	return b.String(), r.Err
}

// altHex is C's "%#x": "0x" before non-zero values only.
func altHex(v int64) string {
	if v == 0 {
		return "0"
	}
	return "0x" + strconv.FormatUint(uint64(v), 16)
}

// JSON renders the map as qemu-img's JSON format, one entry per line.
func (r *MapResult) JSON() (string, error) {
	var b strings.Builder
	for i, e := range r.Entries {
		if i == 0 {
			b.WriteByte('[')
		} else {
			b.WriteString(",\n")
		}
		fmt.Fprintf(&b, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
		if e.HasOffset {
			fmt.Fprintf(&b, `, "offset": %d`, e.Offset)
		}
		b.WriteByte('}')
	}
	if r.Err != nil {
		return b.String(), r.Err
	}
	b.WriteString("]\n")
	return b.String(), nil
}
