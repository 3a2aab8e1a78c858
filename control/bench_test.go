package control

import (
	"context"
	"sort"
	"testing"
	"time"
)

func TestBenchWrites(t *testing.T) {
	for _, tc := range []struct {
		name          string
		o             BenchOptions
		wantOffs      []int64
		wantFlushes   int
		wantPatternAt int64
	}{
		{
			name:     "wraps at the end",
			o:        BenchOptions{Count: 5, Depth: 2, BufSize: 4096, Step: 12288, Offset: 8192, Write: true, Pattern: 0x5a},
			wantOffs: []int64{0, 8192, 12288, 20480, 24576},
		},
		{
			name:        "drained flushes every interval",
			o:           BenchOptions{Count: 40, Depth: 4, BufSize: 512, Write: true, FlushInterval: 10, Drain: true},
			wantFlushes: 4,
		},
		{
			name:        "writethrough flushes every write",
			o:           BenchOptions{Count: 7, Depth: 3, BufSize: 512, Write: true, WriteThrough: true},
			wantFlushes: 7,
		},
	} {
		img := newMemImage("b", 32768)
		o := tc.o
		o.Image = img
		if _, err := Bench(context.Background(), o); err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		var offs []int64
		for _, w := range img.log {
			offs = append(offs, w.off)
		}
		sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
		if len(img.log) != o.Count || tc.wantOffs != nil && !equalInts(offs, tc.wantOffs) {
			t.Errorf("%s: wrote at %v, want %d writes at %v", tc.name, offs, o.Count, tc.wantOffs)
		}
		if img.flushes != tc.wantFlushes {
			t.Errorf("%s: %d flushes, want %d", tc.name, img.flushes, tc.wantFlushes)
		}
		if o.Pattern != 0 && img.data[tc.wantOffs[0]] != o.Pattern {
			t.Errorf("%s: wrote %#x, want the pattern %#x", tc.name, img.data[tc.wantOffs[0]], o.Pattern)
		}
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestBenchErrors(t *testing.T) {
	img := newMemImage("b", 8192)
	_, err := Bench(context.Background(), BenchOptions{Image: img, Count: 3, Depth: 2, BufSize: 4096, Offset: 6144})
	if want := "Failed request: Input/output error"; err == nil || err.Error() != want {
		t.Errorf("request past the end: %v, want %q", err, want)
	}
	img.failReadAt = 0
	_, err = Bench(context.Background(), BenchOptions{Image: img, Count: 3, Depth: 2, BufSize: 4096})
	if want := "Failed request: Input/output error"; err == nil || err.Error() != want {
		t.Errorf("failing read: %v, want %q", err, want)
	}
	// Depth 0 never starts a request: like qemu-img it waits, here
	// until the context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := Bench(ctx, BenchOptions{Image: img, Count: 1, Depth: 0, BufSize: 512}); err == nil {
		t.Error("depth 0: no error")
	}
}

func TestBenchText(t *testing.T) {
	o := BenchOptions{Count: 75000, Depth: 64, BufSize: 4096, Write: true, FlushInterval: 128}
	want := "Sending 75000 write requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n" +
		"Sending flush every 128 requests\n"
	if got := o.Header(); got != want {
		t.Errorf("header %q, want %q", got, want)
	}
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "Run completed in 0.000 seconds.\n"},
		{1234567 * time.Microsecond, "Run completed in 1.235 seconds.\n"},
		{12*time.Second + 500*time.Microsecond, "Run completed in 12.001 seconds.\n"},
	} {
		if got := BenchSummary(tc.d); got != tc.want {
			t.Errorf("BenchSummary(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}
