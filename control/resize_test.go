package control

import (
	"errors"
	"testing"
)

func TestParseResizeSize(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want ResizeSize
		ok   bool
	}{
		{"1G", ResizeSize{0, 1 << 30}, true},
		{"+1G", ResizeSize{1, 1 << 30}, true},
		{"-512k", ResizeSize{-1, 512 << 10}, true},
		{"1.5M", ResizeSize{0, 3 << 19}, true},
		{"+0", ResizeSize{1, 0}, true},
		// Unsigned sizes of 2^63 and more turn negative.
		{"18446744073709551615", ResizeSize{0, -1}, true},
		{"1x", ResizeSize{}, false},
		{"", ResizeSize{}, false},
		{"+", ResizeSize{}, false},
		{"--1", ResizeSize{}, false},
	} {
		got, err := ParseResizeSize(tc.arg)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseResizeSize(%q) = %+v, %v; want %+v, ok %v", tc.arg, got, err, tc.want, tc.ok)
		}
	}
}

// resizableImage records the resize it is asked for.
type resizableImage struct {
	*memImage
	size            int64
	prealloc        string
	shrink, resized bool
}

func (r *resizableImage) Size() int64 { return r.memImage.Size() }
func (r *resizableImage) Resize(size int64, prealloc string, shrink bool) error {
	r.size, r.prealloc, r.shrink, r.resized = size, prealloc, shrink, true
	return nil
}

func TestResize(t *testing.T) {
	const cur = 1 << 20
	for _, tc := range []struct {
		size     ResizeSize
		prealloc string
		shrink   bool
		want     int64
		err      string
	}{
		{size: ResizeSize{0, 2 << 20}, want: 2 << 20},
		{size: ResizeSize{1, 4096}, want: cur + 4096},
		{size: ResizeSize{-1, 4096}, shrink: true, want: cur - 4096},
		{size: ResizeSize{-1, 4096}, err: ErrShrinkRefused.Error()},
		{size: ResizeSize{-1, cur}, err: "New image size must be positive"},
		{size: ResizeSize{1, -cur - 1}, err: "New image size must be positive"},
		{size: ResizeSize{0, cur}, prealloc: "full", err: "Preallocation can only be used for growing images"},
		{size: ResizeSize{0, cur}, prealloc: "off", want: cur},
		{size: ResizeSize{1, 1}, prealloc: "falloc", want: cur + 1},
		{size: ResizeSize{0, 1<<63 - 1}, err: "offset(9223372036854775807) exceeds maximum(9223372035781033984)"},
	} {
		img := &resizableImage{memImage: newMemImage("r", cur)}
		err := Resize(ResizeOptions{Image: img, Size: tc.size, Prealloc: tc.prealloc, Shrink: tc.shrink})
		switch {
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("%+v: error %v, want %q", tc.size, err, tc.err)
		case tc.err == "" && (err != nil || img.size != tc.want || img.shrink != tc.shrink):
			t.Errorf("%+v: resized to %d (shrink %v), %v; want %d", tc.size, img.size, img.shrink, err, tc.want)
		case tc.err != "" && img.resized:
			t.Errorf("%+v: resized despite %q", tc.size, tc.err)
		}
	}
	err := Resize(ResizeOptions{Image: newMemImage("r", cur), Size: ResizeSize{1, 1}})
	if err == nil || err.Error() != "Image format driver does not support resize" {
		t.Errorf("image without resize: %v", err)
	}
	if !errors.Is(Resize(ResizeOptions{Image: &resizableImage{memImage: newMemImage("r", cur)}, Size: ResizeSize{0, 1}}), ErrShrinkRefused) {
		t.Error("shrink without --shrink is not ErrShrinkRefused")
	}
}
