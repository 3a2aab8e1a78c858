package control

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imgfs/imgfs/formats"
)

// pattern builds a buffer from a string, one 512-byte sector per
// character: 'D' data, 'Z' zeroes.
func pattern(s string) []byte {
	b := make([]byte, 512*len(s))
	for i, c := range s {
		if c == 'D' {
			for j := range 512 {
				b[i*512+j] = byte(i + j%7 + 1)
			}
		}
	}
	return b
}

func TestAllocatedSectorsMin(t *testing.T) {
	tests := []struct {
		sectors              string
		minimum, start, algn int64
		allocated            bool
		n                    int64
	}{
		{"DDDD", 8, 0, 8, true, 4},
		{"ZZZZ", 8, 0, 8, false, 4},
		// A zero run ends early at an alignment boundary...
		{"ZZZZZZZZZZDD", 8, 0, 8, false, 8},
		// ...and one shorter than the tail is written with the data.
		{"ZZDDDD", 8, 0, 8, true, 6},
		// Data runs end aligned; an aligned zero run of min sectors
		// ends the write.
		{"DDZZZZZZZZZZZZZZZZDD", 8, 0, 8, true, 8},
		// Zero runs shorter than min stay inside the write.
		{"DDZZZZZZZZZZZZZZZZDD", 32, 0, 8, true, 20},
		{"DZD", 8, 0, 1, true, 3},
		{"DZZD", 2, 0, 1, true, 1},
		// The start sector shifts the alignment.
		{"ZZZZZZZZZZDD", 8, 3, 8, false, 5},
	}
	for _, tt := range tests {
		buf := pattern(tt.sectors)
		a, n := allocatedSectorsMin(buf, int64(len(tt.sectors)), tt.minimum, tt.start, tt.algn)
		if a != tt.allocated || n != tt.n {
			t.Errorf("%s min=%d start=%d align=%d: got (%v, %d), want (%v, %d)",
				tt.sectors, tt.minimum, tt.start, tt.algn, a, n, tt.allocated, tt.n)
		}
	}
}

func TestParseCacheMode(t *testing.T) {
	tests := []struct {
		mode string
		want CacheMode
		ok   bool
	}{
		{"none", CacheMode{Direct: true}, true},
		{"off", CacheMode{Direct: true}, true},
		{"directsync", CacheMode{Direct: true, WriteThrough: true}, true},
		{"writeback", CacheMode{}, true},
		{"writethrough", CacheMode{WriteThrough: true}, true},
		{"unsafe", CacheMode{NoFlush: true}, true},
		{"foo", CacheMode{}, false},
	}
	for _, tt := range tests {
		got, ok := ParseCacheMode(tt.mode)
		if got != tt.want || ok != tt.ok {
			t.Errorf("ParseCacheMode(%q) = %+v, %v", tt.mode, got, ok)
		}
	}
}

// sampleSource is a 1 MiB image with every kind of range convert meets.
func sampleSource(name string) *memImage {
	src := newMemImage(name, 1<<20)
	rnd := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		return b
	}
	src.fill(0, random(64<<10))
	src.fill(64<<10, make([]byte, 64<<10)) // allocated, but zeroes
	// 128k..192k unallocated
	src.fill(200<<10, random(1<<10))
	src.mark(256<<10, 64<<10, allocatedZero)
	withGap := random(64 << 10)
	clear(withGap[8<<10 : 9<<10]) // 1 KiB of zeroes inside data
	clear(withGap[32<<10 : 40<<10])
	src.fill(400<<10, withGap)
	src.fill(1<<20-512, random(512))
	return src
}

func newTarget(t *testing.T) string {
	return filepath.Join(t.TempDir(), "target")
}

// contents reads a whole image.
func contents(t *testing.T, img formats.Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func stateAt(img *memImage, off int64) sectorState { return img.state[off/512] }

func TestConvertCopiesAndKeepsHoles(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*ConvertOptions)
		check  func(t *testing.T, dst *memImage)
	}{
		{"default", func(*ConvertOptions) {}, func(t *testing.T, dst *memImage) {
			for _, off := range []int64{64 << 10, 130 << 10, 256 << 10, 400<<10 + 32<<10} {
				if s := stateAt(dst, off); s != unallocated {
					t.Errorf("offset %d: state %d, want a hole", off, s)
				}
			}
			if s := stateAt(dst, 400<<10+8<<10); s != allocatedData {
				t.Errorf("a 1 KiB zero gap inside data must be written, state %d", s)
			}
		}},
		{"sparse 0 writes everything", func(o *ConvertOptions) { o.SparseSize = 0 }, func(t *testing.T, dst *memImage) {
			for i, s := range dst.state {
				if s != allocatedData {
					t.Fatalf("sector %d not written with -S 0", i)
				}
			}
		}},
		{"sparse 16k keeps 8k gap", func(o *ConvertOptions) { o.SparseSize = 16 << 10 }, func(t *testing.T, dst *memImage) {
			if s := stateAt(dst, 400<<10+32<<10); s != allocatedData {
				t.Errorf("an 8 KiB gap is below -S 16k and must be written, state %d", s)
			}
		}},
		{"copy whole", func(o *ConvertOptions) { o.CopyWhole = true }, func(t *testing.T, dst *memImage) {
			if s := stateAt(dst, 64<<10); s != allocatedData {
				t.Errorf("-C copies zero data as data, state %d", s)
			}
		}},
		{"one worker", func(o *ConvertOptions) { o.Workers = 1 }, nil},
		{"out of order", func(o *ConvertOptions) { o.OutOfOrder = true; o.Workers = 16 }, nil},
		{"writethrough", func(o *ConvertOptions) { o.TargetCache = "writethrough" }, func(t *testing.T, dst *memImage) {
			if dst.flushes < len(dst.log) {
				t.Errorf("%d flushes for %d writes", dst.flushes, len(dst.log))
			}
		}},
		{"unsafe does not flush", func(*ConvertOptions) {}, func(t *testing.T, dst *memImage) {
			if dst.flushes != 0 {
				t.Errorf("%d flushes with cache=unsafe", dst.flushes)
			}
		}},
		{"writeback flushes at the end", func(o *ConvertOptions) { o.TargetCache = "writeback" }, func(t *testing.T, dst *memImage) {
			if dst.flushes != 1 {
				t.Errorf("%d flushes with cache=writeback, want 1", dst.flushes)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := sampleSource("src")
			o := ConvertOptions{
				Sources: []formats.Image{src}, Target: newTarget(t), TargetFormat: "memtest",
				SparseSize: DefaultSparseSize, Workers: 4,
			}
			tt.mutate(&o)
			if err := Convert(context.Background(), o); err != nil {
				t.Fatal(err)
			}
			dst := memLookup(o.Target)
			if !bytes.Equal(contents(t, dst), contents(t, src)) {
				t.Fatal("target differs from source")
			}
			if !o.OutOfOrder {
				for i := 1; i < len(dst.log); i++ {
					if dst.log[i].off < dst.log[i-1].off+dst.log[i-1].n {
						t.Fatalf("write %d at %d before the end of write %d", i, dst.log[i].off, i-1)
					}
				}
			}
			if tt.check != nil {
				tt.check(t, dst)
			}
		})
	}
}

func TestConvertConcatenatesUnalignedSources(t *testing.T) {
	a := newMemImage("a", 1000) // rounded up to 1024 in the target
	a.fill(0, bytes.Repeat([]byte{0xaa}, 1000))
	b := sampleSource("b")
	o := ConvertOptions{Sources: []formats.Image{a, b}, Target: newTarget(t), TargetFormat: "memtest", SparseSize: DefaultSparseSize}
	if err := Convert(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	dst := memLookup(o.Target)
	if dst.Size() != 1024+1<<20 {
		t.Fatalf("target size %d", dst.Size())
	}
	want := append(append(contents(t, a), make([]byte, 24)...), contents(t, b)...)
	if !bytes.Equal(contents(t, dst), want) {
		t.Fatal("target is not the concatenation of the sources")
	}
}

func TestConvertCompressed(t *testing.T) {
	for _, ooo := range []bool{false, true} {
		src := sampleSource("src")
		o := ConvertOptions{
			Sources: []formats.Image{src}, Target: newTarget(t), TargetFormat: "memtest",
			Compressed: true, SparseSize: DefaultSparseSize, Workers: 1, OutOfOrder: ooo,
		}
		if err := Convert(context.Background(), o); err != nil {
			t.Fatal(err)
		}
		dst := memLookup(o.Target)
		if !bytes.Equal(contents(t, dst), contents(t, src)) {
			t.Fatal("target differs from source")
		}
		seen := map[int64]bool{}
		for _, w := range dst.log {
			if w.off%memCluster != 0 || w.n != memCluster && w.off+w.n != dst.Size() {
				t.Errorf("write %+v is not a whole cluster", w)
			}
			seen[w.off] = true
		}
		// Cluster 1 holds only zero data and 2 is unallocated: skipped.
		for _, off := range []int64{memCluster, 2 * memCluster} {
			if seen[off] {
				t.Errorf("zero cluster at %d was written", off)
			}
		}
		if !seen[3*memCluster] {
			t.Errorf("a cluster with 1 KiB of data was not written")
		}
		// Random data does not shrink and is stored as it is; the
		// cluster with 1 KiB of data does.
		for _, w := range dst.log {
			if want := map[int64]string{0: "data", 3 * memCluster: "compressed"}[w.off]; want != "" && w.kind != want {
				t.Errorf("cluster at %d written as %s, want %s", w.off, w.kind, want)
			}
		}
	}
}

func TestConvertBackingOptionNeedsFormat(t *testing.T) {
	src := sampleSource("src")
	o := ConvertOptions{Sources: []formats.Image{src}, Target: newTarget(t), TargetFormat: "memtest", Compressed: true,
		Options: "cluster_size=4096,backing_file=x"}
	err := Convert(context.Background(), o)
	if err == nil || err.Error() != "Use of backing file requires explicit backing format" {
		t.Fatalf("got %v", err)
	}
}

func TestConvertExistingTarget(t *testing.T) {
	for _, isZero := range []bool{false, true} {
		src := sampleSource("src")
		dst := newMemImage("dst", 2<<20) // larger than the source
		dst.fill(0, bytes.Repeat([]byte{0xff}, 2<<20))
		dst.log = nil
		o := ConvertOptions{
			Sources: []formats.Image{src}, Target: "dst", SkipCreate: true, TargetIsZero: isZero,
			OpenTarget: func(CacheMode) (formats.Image, error) { return dst, nil }, SparseSize: DefaultSparseSize,
		}
		if err := Convert(context.Background(), o); err != nil {
			t.Fatal(err)
		}
		got := contents(t, dst)
		if !bytes.Equal(got[1<<20:], bytes.Repeat([]byte{0xff}, 1<<20)) {
			t.Error("bytes past the source's size were touched")
		}
		zeroes := 0
		for _, w := range dst.log {
			if w.kind == "zero" {
				zeroes++
			}
		}
		if isZero {
			// The target claims to be zero: zero ranges are skipped, so
			// the 0xff there stays.
			if zeroes != 0 || got[130<<10] != 0xff {
				t.Errorf("--target-is-zero: %d zero writes, byte %#x", zeroes, got[130<<10])
			}
			continue
		}
		if zeroes == 0 || !bytes.Equal(got[:1<<20], contents(t, src)) {
			t.Errorf("-n: %d zero writes; content equal: %v", zeroes, bytes.Equal(got[:1<<20], contents(t, src)))
		}
	}
}

func TestConvertTargetTooSmall(t *testing.T) {
	dst := newMemImage("dst", 4096)
	o := ConvertOptions{
		Sources: []formats.Image{sampleSource("src")}, Target: "dst", SkipCreate: true,
		OpenTarget: func(CacheMode) (formats.Image, error) { return dst, nil },
	}
	if err := Convert(context.Background(), o); err == nil || err.Error() != "output file is smaller than input file" {
		t.Fatalf("got %v", err)
	}
}

func TestConvertWithBackingCopiesTopOnly(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base")
	if err := formats.Lookup("memtest").Create(base, optionsWith(t, "size=1048576")); err != nil {
		t.Fatal(err)
	}
	baseImg := memLookup(base)
	baseImg.fill(0, bytes.Repeat([]byte{0x11}, 512<<10))
	top := newMemImage("top", 1<<20)
	top.backing = baseImg
	top.fill(4096, bytes.Repeat([]byte{0x22}, 4096))
	top.mark(64<<10, 64<<10, allocatedZero)
	o := ConvertOptions{
		Sources: []formats.Image{top}, Target: filepath.Join(dir, "out"), TargetFormat: "memtest",
		BackingFile: "base", BackingFormat: "memtest", SparseSize: DefaultSparseSize,
	}
	if err := Convert(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	dst := memLookup(o.Target)
	if !bytes.Equal(contents(t, dst), contents(t, top)) {
		t.Fatal("target differs from source")
	}
	var written int64
	for _, w := range dst.log {
		if w.kind == "data" {
			written += w.n
		}
	}
	if written != 4096 {
		t.Errorf("%d data bytes written, want only the top's 4096", written)
	}
	if s := stateAt(dst, 64<<10); s != allocatedZero {
		t.Errorf("a zero range over backing data must be written as zeroes, state %d", s)
	}
}

func optionsWith(t *testing.T, list string) *formats.Options {
	o := formats.NewOptions(formats.Lookup("memtest").CreateSpecs())
	if err := o.Parse(list); err != nil {
		t.Fatal(err)
	}
	return o
}

// hugeEmpty is a 16 TiB image that allocates nothing and counts the
// bytes and calls it sees.
type hugeEmpty struct {
	memImage
	mu                sync.Mutex
	zeroCalls, writes int
}

func (h *hugeEmpty) Size() int64 { return 16 << 40 }
func (h *hugeEmpty) BlockStatus(off, length int64) (formats.Extent, error) {
	return formats.Extent{Length: min(length, h.Size()-off)}, nil
}
func (h *hugeEmpty) WriteAt(p []byte, off int64) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.writes++
	return len(p), nil
}
func (h *hugeEmpty) WriteZeroes(off, n int64, mayUnmap bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.zeroCalls++
	return nil
}

func TestConvertEmptyHugeImageIsFast(t *testing.T) {
	for _, sparse := range []int64{DefaultSparseSize, 0} {
		src, dst := &hugeEmpty{}, &hugeEmpty{}
		var progress int
		o := ConvertOptions{
			Sources: []formats.Image{src}, Target: "dst", SkipCreate: true, SparseSize: sparse,
			OpenTarget: func(CacheMode) (formats.Image, error) { return dst, nil },
			Progress:   func(done, total int64) { progress++ },
		}
		if sparse == 0 {
			// -S 0 writes every byte; on 16 TiB that is not a quick test,
			// so stop it after a moment and check that it stops.
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			err := Convert(ctx, o)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) || dst.writes == 0 {
				t.Fatalf("-S 0: got %v after %d writes", err, dst.writes)
			}
			continue
		}
		start := time.Now()
		if err := Convert(context.Background(), o); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("converting an empty 16 TiB image took %v", d)
		}
		if dst.writes != 0 || progress != 0 {
			t.Errorf("%d data writes, %d progress reports for an empty image", dst.writes, progress)
		}
		if want := int((16<<40 + maxStatusRequest - 1) / maxStatusRequest); dst.zeroCalls != want {
			t.Errorf("%d zero writes, want %d", dst.zeroCalls, want)
		}
	}
}

func TestConvertReadErrorStops(t *testing.T) {
	src := sampleSource("src")
	src.failReadAt = 400<<10 + 100
	o := ConvertOptions{Sources: []formats.Image{src}, Target: newTarget(t), TargetFormat: "memtest", SparseSize: DefaultSparseSize}
	err := Convert(context.Background(), o)
	if err == nil || !strings.HasPrefix(err.Error(), "error while reading at byte ") {
		t.Fatalf("got %v", err)
	}

	// --salvage turns the bad sector into zeroes and warns.
	var warnings []string
	o.Target, o.Salvage = newTarget(t), true
	o.Warn = func(msg string) { warnings = append(warnings, msg) }
	if err := Convert(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || warnings[0] != "error while reading offset 409600: Input/output error" {
		t.Errorf("warnings %q", warnings)
	}
	src.failReadAt = -1
	got, want := contents(t, memLookup(o.Target)), contents(t, src)
	clear(want[400<<10 : 400<<10+512])
	if !bytes.Equal(got, want) {
		t.Error("salvaged target differs")
	}
}

func TestConvertProgress(t *testing.T) {
	src := sampleSource("src")
	var mu sync.Mutex
	var last, total int64
	o := ConvertOptions{
		Sources: []formats.Image{src}, Target: newTarget(t), TargetFormat: "memtest", SparseSize: DefaultSparseSize, Workers: 8,
		Progress: func(done, tot int64) {
			mu.Lock()
			defer mu.Unlock()
			if done < last {
				t.Errorf("progress went back from %d to %d", last, done)
			}
			last, total = done, tot
		},
	}
	if err := Convert(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if last != total || total == 0 || total >= src.Size() {
		t.Errorf("progress ended at %d/%d", last, total)
	}
}

func TestConvertOptionErrors(t *testing.T) {
	src := sampleSource("src")
	tests := []struct {
		o    ConvertOptions
		want string
	}{
		{ConvertOptions{TargetFormat: "nosuch"}, "Unknown file format 'nosuch'"},
		{ConvertOptions{TargetFormat: "memtest", Options: "foo=1"}, "Invalid parameter 'foo'"},
		{ConvertOptions{TargetFormat: "memtest", BackingFile: "b"}, "Use of backing file requires explicit backing format"},
		{ConvertOptions{TargetFormat: "memtest", BackingFile: "b", BackingFormat: "memtest", Sources: []formats.Image{src, src}},
			"Having a backing file for the target makes no sense when concatenating multiple input images"},
		{ConvertOptions{TargetFormat: "memtest", TargetCache: "foo"}, "Invalid cache option: foo"},
		{ConvertOptions{TargetFormat: "memtest", Options: "size=2G", Sources: []formats.Image{&hugeEmpty{}}},
			"/target: error while converting memtest: Could not resize file: file too large"},
	}
	for _, tt := range tests {
		if tt.o.Sources == nil {
			tt.o.Sources = []formats.Image{src}
		}
		tt.o.Target = newTarget(t)
		err := Convert(context.Background(), tt.o)
		if err == nil || !strings.HasSuffix(err.Error(), tt.want) {
			t.Errorf("%+v: got %v, want %q", tt.o, err, tt.want)
		}
	}
}
