package control

import (
	"context"
	"io"

	"github.com/imgfs/imgfs/formats"
)

// stubImage is an in-memory image for the report tests: its block status
// is a list of runs, its data a byte slice, with an optional backing
// image.
type stubImage struct {
	data    []byte
	runs    []stubRun
	backing formats.Image
	name    string
	desc    *formats.Description
	check   func(mode formats.CheckMode, report func(string)) (*formats.CheckResult, error)
}

// stubRun is one block status run; host offsets count from the run's
// start.
type stubRun struct {
	length int64
	status formats.Status
	offset int64
	file   string
}

var (
	_ formats.Image     = (*stubImage)(nil)
	_ formats.Backed    = (*stubImage)(nil)
	_ formats.Describer = (*stubImage)(nil)
)

func (s *stubImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(s.data)) {
		return 0, io.EOF
	}
	n := copy(p, s.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (s *stubImage) WriteAt(p []byte, off int64) (int, error) { return 0, formats.ErrReadOnly }
func (s *stubImage) Size() int64                              { return int64(len(s.data)) }
func (s *stubImage) Flush() error                             { return nil }
func (s *stubImage) Close() error                             { return nil }
func (s *stubImage) Format() string                           { return "stub" }
func (s *stubImage) Filename() string                         { return s.name }
func (s *stubImage) Backing() formats.Image                   { return s.backing }
func (s *stubImage) BackingInfo() (string, string)            { return "", "" }

func (s *stubImage) Describe() (*formats.Description, error) {
	if s.desc == nil {
		return &formats.Description{}, nil
	}
	return s.desc, nil
}

func (s *stubImage) BlockStatus(off, length int64) (formats.Extent, error) {
	start := int64(0)
	for _, r := range s.runs {
		if off < start+r.length {
			e := formats.Extent{Length: min(start+r.length-off, length), Status: r.status}
			if r.status&formats.StatusOffsetValid != 0 {
				e.Offset, e.File = r.offset+off-start, r.file
			}
			return e, nil
		}
		start += r.length
	}
	return formats.Extent{Length: length}, nil
}

// checkedStub adds a Checker to stubImage.
type checkedStub struct{ *stubImage }

func (c checkedStub) Check(_ context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	return c.check(mode, report)
}
