package formats_test

import (
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// layer is an in-memory image for ChainStatus: runs of status over
// [0, size), and an optional backing layer. Only the methods ChainStatus
// uses do anything.
type layer struct {
	formats.Image // nil; calling anything else panics
	size          int64
	runs          []run
	backing       *layer
}

type run struct {
	end    int64 // exclusive
	status formats.Status
}

func (l *layer) Size() int64 { return l.size }

func (l *layer) BlockStatus(off, length int64) (formats.Extent, error) {
	for _, r := range l.runs {
		if off < r.end {
			return formats.Extent{Length: min(length, r.end-off, l.size-off), Status: r.status}, nil
		}
	}
	return formats.Extent{Length: min(length, l.size-off)}, nil
}

func (l *layer) Backing() formats.Image {
	if l.backing == nil {
		return nil
	}
	return l.backing
}

func (l *layer) BackingInfo() (string, string) { return "", "" }

func TestChainStatus(t *testing.T) {
	const k = 1 << 10
	data, zero := formats.StatusData, formats.StatusZero
	// The chain of the qemu-img map example in the comments: b1 (2M, data
	// at [0, 64k)) <- b2 (4M, data at [1M, 1M+64k)) <- b3 (4M, empty), with
	// qemu-img 7.2's map output for b3.
	b1 := &layer{size: 2048 * k, runs: []run{{64 * k, data}, {2048 * k, 0}}}
	b2 := &layer{size: 4096 * k, runs: []run{{1024 * k, 0}, {1088 * k, data}}, backing: b1}
	b3 := &layer{size: 4096 * k, backing: b2}
	want := []struct {
		start, length int64
		depth         int
		present       bool
		status        formats.Status
	}{
		{0, 64 * k, 2, true, data},
		{64 * k, 960 * k, 2, false, zero},
		{1024 * k, 64 * k, 1, true, data},
		{1088 * k, 960 * k, 2, false, zero},
		{2048 * k, 2048 * k, 1, false, zero}, // past the end of b1
	}
	var off int64
	for i, w := range want {
		e, err := formats.ChainStatus(b3, off, b3.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if off != w.start || e.Length != w.length || e.Depth != w.depth || e.Present != w.present || e.Status != w.status {
			t.Errorf("extent %d at %d: %+v, want %+v", i, off, e, w)
		}
		off += e.Length
	}
	if off != b3.Size() {
		t.Errorf("extents end at %d, want %d", off, b3.Size())
	}

	// An allocated zero run in a layer hides the data below it.
	top := &layer{size: 2048 * k, runs: []run{{32 * k, zero}}, backing: b1}
	e, err := formats.ChainStatus(top, 0, 2048*k)
	if err != nil {
		t.Fatal(err)
	}
	if e.Depth != 0 || !e.Present || e.Status != zero || e.Length != 32*k {
		t.Errorf("zero run over data: %+v", e)
	}
	// A request shorter than the run is not exceeded at any depth.
	e, _ = formats.ChainStatus(b3, 10, 100)
	if e.Length != 100 || e.Depth != 2 {
		t.Errorf("short request: %+v", e)
	}
}
