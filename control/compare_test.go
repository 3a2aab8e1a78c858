package control

import (
	"context"
	"errors"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// stubData returns an image of size bytes, all data, with b's bytes at off.
func stubData(size int, off int, b ...byte) *stubImage {
	img := &stubImage{data: make([]byte, size), runs: []stubRun{{int64(size), formats.StatusData, 0, ""}}}
	copy(img.data[off:], b)
	return img
}

// stubEmpty returns an image of size bytes with nothing allocated.
func stubEmpty(size int) *stubImage { return &stubImage{data: make([]byte, size)} }

func TestCompare(t *testing.T) {
	const mib = 1 << 20
	tests := []struct {
		name       string
		a, b       formats.Image
		strict     bool
		identical  bool
		text       string
		progressed int64
	}{
		{"identical data", stubData(mib, 5, 1), stubData(mib, 5, 1), false, true, "Images are identical.\n", mib},
		{"zero data equals unallocated", stubData(mib, 0), stubEmpty(mib), false, true, "Images are identical.\n", mib},
		{"mismatch located to the sector", stubData(3*mib, 2*mib+1600, 1), stubData(3*mib, 0), false, false,
			"Content mismatch at offset 2098688!\n", 2 * mib},
		{"data against unallocated", stubEmpty(mib), stubData(mib, 700, 9), false, false,
			"Content mismatch at offset 512!\n", 0},
		{"longer image with zeroes", stubData(mib, 0), stubData(2*mib, 0), false, true,
			"Warning: Image size mismatch!\nImages are identical.\n", 2 * mib},
		{"data in the common part", stubEmpty(2 * mib), stubData(mib, 1024, 1), false, false,
			"Content mismatch at offset 1024!\n", 0},
		{"longer first image with data", stubData(2*mib, mib+1024, 1), stubEmpty(mib), false, false,
			"Warning: Image size mismatch!\nContent mismatch at offset 1049600!\n", mib},
		{"strict size", stubData(mib, 0), stubData(2*mib, 0), true, false, "Strict mode: Image size mismatch!\n", 0},
		{"strict status", stubData(mib, 0), stubEmpty(mib), true, false, "Strict mode: Offset 0 block status mismatch!\n", 0},
		{"strict identical", stubData(mib, 3, 3), stubData(mib, 3, 3), true, true, "Images are identical.\n", mib},
	}
	for _, tc := range tests {
		var done int64 = -1
		res, err := Compare(context.Background(), CompareOptions{
			Image1: tc.a, Image2: tc.b, Name1: "a", Name2: "b", Strict: tc.strict,
			Progress: func(d, total int64) { done = d },
		})
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if res.Identical != tc.identical || res.Text != tc.text || done != tc.progressed {
			t.Errorf("%s: got %v %q progress %d, want %v %q progress %d", tc.name,
				res.Identical, res.Text, done, tc.identical, tc.text, tc.progressed)
		}
	}
}

// failingImage fails block status or reads.
type failingImage struct {
	*stubImage
	statusErr bool
}

func (f failingImage) BlockStatus(off, length int64) (formats.Extent, error) {
	if f.statusErr {
		return formats.Extent{}, errors.New("boom")
	}
	return f.stubImage.BlockStatus(off, length)
}

func (f failingImage) ReadAt(p []byte, off int64) (int, error) {
	return 0, errors.New("Input/output error")
}

func TestCompareErrors(t *testing.T) {
	ok := stubData(4096, 0)
	_, err := Compare(context.Background(), CompareOptions{Image1: ok, Image2: failingImage{stubData(4096, 0), true}, Name1: "a", Name2: "b"})
	if !errors.Is(err, ErrAllocationTest) || err.Error() != "Sector allocation test failed for b" {
		t.Errorf("status failure: %v", err)
	}
	_, err = Compare(context.Background(), CompareOptions{Image1: failingImage{stubData(4096, 0), false}, Image2: ok, Name1: "a", Name2: "b"})
	if !errors.Is(err, ErrCompareRead) || err.Error() != "Error while reading offset 0 of a: Input/output error" {
		t.Errorf("read failure: %v", err)
	}
}
