package control

import (
	"context"
	"errors"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

const kib = 1024

func TestMap(t *testing.T) {
	data := formats.StatusData | formats.StatusOffsetValid
	top := &stubImage{data: make([]byte, 512*kib), runs: []stubRun{
		{64 * kib, data, 0x50000, "a"},
		{64 * kib, data, 0x60000, "a"}, // contiguous: merges
		{64 * kib, data, 0x90000, "a"},
		{64 * kib, formats.StatusZero, 0, ""},
		// Unallocated from here: reads the backing image, then zeroes
		// past its end.
	}}
	top.backing = &stubImage{data: make([]byte, 384*kib), runs: []stubRun{{384 * kib, data, 0, "b"}}}
	tests := []struct {
		name       string
		start, max int64
		human      string
		json       string
	}{
		{"whole", 0, -1,
			"Offset          Length          Mapped to       File\n" +
				"0               0x20000         0x50000         a\n" +
				"0x20000         0x10000         0x90000         a\n" +
				"0x40000         0x20000         0x40000         b\n",
			`[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 131072, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 589824},
{ "start": 196608, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
{ "start": 262144, "length": 131072, "depth": 1, "present": true, "zero": false, "data": true, "offset": 262144},
{ "start": 393216, "length": 131072, "depth": 0, "present": false, "zero": true, "data": false}]
`},
		{"window", 100, 64 * kib,
			"Offset          Length          Mapped to       File\n" +
				"0x64            0x10000         0x50064         a\n",
			`[{ "start": 100, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327780}]
`},
		{"past the end", 1 << 30, -1,
			"Offset          Length          Mapped to       File\n",
			`[{ "start": 1073741824, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]
`},
	}
	for _, tc := range tests {
		for _, human := range []bool{true, false} {
			res := Map(context.Background(), MapOptions{Image: top, Start: tc.start, MaxLength: tc.max, Human: human})
			got, err := res.JSON()
			want := tc.json
			if human {
				got, err = res.Human()
				want = tc.human
			}
			if err != nil || got != want {
				t.Errorf("%s (human %v): err %v, got\n%s\nwant\n%s", tc.name, human, err, got, want)
			}
		}
	}
}

// The human map refuses data it cannot point to, after the rows before.
func TestMapHumanUnmappable(t *testing.T) {
	img := &stubImage{data: make([]byte, 128*kib), runs: []stubRun{
		{64 * kib, formats.StatusData | formats.StatusOffsetValid, 0, "a"},
		{64 * kib, formats.StatusData | formats.StatusCompressed, 0, ""},
	}}
	got, err := Map(context.Background(), MapOptions{Image: img, MaxLength: -1, Human: true}).Human()
	want := "Offset          Length          Mapped to       File\n0               0x10000         0               a\n"
	if !errors.Is(err, ErrMapUnmappable) || got != want {
		t.Errorf("got %q, %v; want %q, %v", got, err, want, ErrMapUnmappable)
	}
}

func TestAltHex(t *testing.T) {
	for in, want := range map[int64]string{0: "0", 1: "0x1", 0xa00000: "0xa00000"} {
		if got := altHex(in); got != want {
			t.Errorf("altHex(%d) = %q, want %q", in, got, want)
		}
	}
}

// overlongImage answers block status with more bytes than asked for.
type overlongImage struct{ *stubImage }

func (o overlongImage) BlockStatus(off, length int64) (formats.Extent, error) {
	return formats.Extent{Length: length + 1, Status: formats.StatusData}, nil
}

// A driver's run past the requested range stops the walk with an error
// instead of overrunning the image.
func TestMapRejectsOverlongStatus(t *testing.T) {
	res := Map(context.Background(), MapOptions{Image: overlongImage{stubData(4096, 0)}, MaxLength: -1})
	if !errors.Is(res.Err, formats.ErrCorrupt) || len(res.Entries) != 0 {
		t.Errorf("got entries %v, err %v; want none and ErrCorrupt", res.Entries, res.Err)
	}
	_, err := Compare(context.Background(), CompareOptions{Image1: overlongImage{stubData(4096, 0)}, Image2: stubData(4096, 0)})
	if !errors.Is(err, ErrAllocationTest) {
		t.Errorf("compare: %v, want ErrAllocationTest", err)
	}
}
