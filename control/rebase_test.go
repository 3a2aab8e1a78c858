package control

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// changerImage is a memImage whose backing reference can be changed;
// err makes SetBacking fail.
type changerImage struct {
	*memImage
	name, format string
	err          error
}

func (c *changerImage) SetBacking(name, format string) error {
	if c.err != nil {
		return c.err
	}
	c.name, c.format = name, format
	return nil
}

func fillSectors(m *memImage, b byte, sectors ...int64) {
	for _, s := range sectors {
		m.fill(s*512, bytes.Repeat([]byte{b}, 512))
	}
}

// TestRebaseWritesDifferences follows a safe rebase sector by sector:
// only sectors the image does not allocate and where the old and new
// backing files differ are written, with the old data, or as zeroes
// where the old backing file has ended.
func TestRebaseWritesDifferences(t *testing.T) {
	old := newMemImage("old", 6*512)
	fillSectors(old, 0xaa, 1, 2, 3, 5)
	newB := newMemImage("new", 8*512)
	fillSectors(newB, 0xaa, 2, 5)
	fillSectors(newB, 0xbb, 7)
	top := newMemImage("top", 8*512)
	top.backing = old
	fillSectors(top, 0x11, 0)
	top.log = nil
	img := &changerImage{memImage: top}
	before := make([]byte, 8*512)
	top.ReadAt(before, 0)

	var progress []int64
	err := Rebase(context.Background(), RebaseOptions{
		Image: img, Backing: "new.img", BackingGiven: true, BackingFormat: "memtest",
		OpenBacking: func(path, format string) (formats.Image, error) {
			if path != "new.img" || format != "memtest" {
				t.Errorf("OpenBacking(%q, %q)", path, format)
			}
			return newB, nil
		},
		Progress: func(done, total int64) { progress = append(progress, done, total) },
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []memWrite{
		{kind: "data", off: 512, n: 512},
		{kind: "data", off: 3 * 512, n: 512},
		{kind: "zero", off: 7 * 512, n: 512},
	}
	if fmt.Sprint(top.log) != fmt.Sprint(want) {
		t.Errorf("writes %v, want %v", top.log, want)
	}
	// The old backing file ends at sector 6, so the unallocated range
	// is compared in two pieces.
	if fmt.Sprint(progress) != "[1 1 2 1]" {
		t.Errorf("progress %v", progress)
	}
	if img.name != "new.img" || img.format != "memtest" {
		t.Errorf("backing set to %q, %q", img.name, img.format)
	}
	top.backing = newB
	after := make([]byte, 8*512)
	top.ReadAt(after, 0)
	if !bytes.Equal(before, after) {
		t.Error("the guest content changed")
	}
}

func TestRebaseChangeErrors(t *testing.T) {
	tests := []struct {
		name      string
		backing   string
		given     bool
		format    string
		changer   bool
		changeErr error
		want      string
		removed   bool
	}{
		{"no format", "b.img", true, "", true, nil, "Could not change the backing file to 'b.img': backing format must be specified", false},
		{"no room", "b.img", true, "memtest", true, fmt.Errorf("too long: %w", syscall.ENOSPC), "Could not change the backing file to 'b.img': No space left in the file header", false},
		{"invalid", "b.img", true, "memtest", true, fmt.Errorf("bad: %w", syscall.EINVAL), "Could not change the backing file to 'b.img': Invalid argument", false},
		{"no errno", "b.img", true, "memtest", true, errors.New("broken"), "Could not change the backing file to 'b.img': Input/output error", false},
		{"unsupported", "b.img", true, "memtest", false, nil, "Could not change the backing file to 'b.img': Operation not supported", false},
		{"remove unsupported", "", false, "", false, nil, "Could not change the backing file to '(null)': Operation not supported", false},
		{"remove", "", true, "memtest", true, nil, "", true},
		{"unknown format", "b.img", true, "bogus", true, nil, "Invalid format name: 'bogus'", false},
	}
	for _, tc := range tests {
		var img formats.Image = newMemImage("top", 512)
		ch := &changerImage{memImage: img.(*memImage), name: "old", format: "old", err: tc.changeErr}
		if tc.changer {
			img = ch
		}
		err := Rebase(context.Background(), RebaseOptions{Image: img, Backing: tc.backing, BackingGiven: tc.given, BackingFormat: tc.format, Unsafe: true})
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || err.Error() != tc.want):
			t.Errorf("%s: got %v, want %s", tc.name, err, tc.want)
		}
		if removed := ch.name == "" && ch.format == ""; removed != tc.removed {
			t.Errorf("%s: backing now %q, %q", tc.name, ch.name, ch.format)
		}
	}
}

func TestAllocatedAbove(t *testing.T) {
	upper := &stubImage{data: make([]byte, 4096), runs: []stubRun{
		{1024, 0, 0, ""}, {1024, formats.StatusData, 0, ""}, {2048, 0, 0, ""},
	}}
	lower := &stubImage{data: make([]byte, 3072), runs: []stubRun{
		{512, formats.StatusZero, 0, ""}, {2560, 0, 0, ""},
	}}
	layers := []formats.Image{upper, lower}
	tests := []struct {
		off, n, length int64
		depth          int
		st             formats.Status
	}{
		{0, 4096, 512, 1, formats.StatusZero}, // the lower layer decides
		{512, 4096, 512, -1, 0},               // nobody allocates
		{1024, 4096, 1024, 0, formats.StatusData},
		{2048, 2048, 1024, -1, 0},
		{3072, 1024, 1024, 1, formats.StatusZero}, // past the lower layer's end
	}
	for _, tc := range tests {
		length, depth, st, err := allocatedAbove(layers, tc.off, tc.n)
		if err != nil || length != tc.length || depth != tc.depth || st != tc.st {
			t.Errorf("allocatedAbove(%d, %d) = %d, %d, %v, %v; want %d, %d, %v", tc.off, tc.n, length, depth, st, err, tc.length, tc.depth, tc.st)
		}
	}
}

// namedStub is a stubImage with a file name and a backing reference.
type namedStub struct {
	*stubImage
	backingName string
}

func (n namedStub) BackingInfo() (string, string) { return n.backingName, "" }

func TestFindBackingImage(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"base", "sub/mid", "sub/top"} {
		p := filepath.Join(dir, f)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	base := namedStub{&stubImage{name: filepath.Join(dir, "base")}, ""}
	mid := namedStub{&stubImage{name: filepath.Join(dir, "sub/mid"), backing: base}, "../base"}
	top := namedStub{&stubImage{name: filepath.Join(dir, "sub/top"), backing: mid}, "mid"}
	chain := []formats.Image{top, mid, base}
	tests := []struct {
		name string
		want int
	}{
		{"mid", 1},                             // relative to top's directory
		{"../base", 2},                         // relative to mid's
		{filepath.Join(dir, "base"), 2},        // absolute
		{filepath.Join(dir, "sub/../base"), 2}, // canonicalised
		{"base", -1},                           // sub/base does not exist
		{"top", -1},                            // the top is nobody's backing file
		{"nbd:host:10809", -1},
	}
	for _, tc := range tests {
		if got := findBackingImage(chain, tc.name); got != tc.want {
			t.Errorf("findBackingImage(%q) = %d, want %d", tc.name, got, tc.want)
		}
	}
}
