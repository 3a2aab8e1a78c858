package tests

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/imgfs/imgfs/formats"
	_ "github.com/imgfs/imgfs/formats/all"
)

// rwSize is the virtual size of the random-write images.
const rwSize = 8 * mib

// TestRandomWrites drives imgfs's qcow2 driver with thousands of random
// writes, zero writes, discards and flushes, first from one goroutine, then, after
// closing and reopening the image, from several at once over neighbouring
// regions that share clusters. A shadow copy in memory tracks what the
// image must read. At the end the real qemu-img must find the image clean
// and equal to the shadow.
func TestRandomWrites(t *testing.T) {
	cases := []struct {
		name, opts string
		backing    bool
	}{
		{name: "default"},
		{name: "cluster-512", opts: "cluster_size=512"},
		{name: "cluster-2M", opts: "cluster_size=2M"},
		{name: "compat-0.10", opts: "compat=0.10"},
		{name: "extended-l2", opts: "extended_l2=on"},
		{name: "refcount-bits-1", opts: "refcount_bits=1"},
		{name: "lazy-refcounts", opts: "lazy_refcounts=on"},
		{name: "data-file", opts: "data_file=t.data"},
		{name: "backing", backing: true},
		{name: "backing-extended-l2", opts: "extended_l2=on", backing: true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			// base is what unwritten ranges read: the backing image's
			// content, or zeroes.
			base := make([]byte, rwSize)
			var extra []string
			if c.backing {
				fillRandom(base, uint64(i))
				if err := os.WriteFile(filepath.Join(dir, "base.raw"), base, 0o644); err != nil {
					t.Fatal(err)
				}
				mustRun(t, dir, qemuImg, "convert", "-O", "qcow2", "base.raw", "base.qcow2")
				extra = []string{"-b", "base.qcow2", "-F", "qcow2"}
			}
			runSteps(t, dir, []step{create("t.qcow2", fmt.Sprint(rwSize), c.opts, extra...)})
			file := filepath.Join(dir, "t.qcow2")
			w := &randomWriter{base: base, shadow: bytes.Clone(base)}

			img := openRW(t, file)
			w.run(t, img, rand.New(rand.NewPCG(uint64(i), 1)), 0, rwSize, 1000)
			w.verify(t, img)
			if err := img.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}

			img = openRW(t, file)
			var wg sync.WaitGroup
			const workers = 4
			// Region borders are deliberately not cluster aligned, so
			// workers write different parts of the same clusters.
			region := rwSize/workers + 777
			for g := range int64(workers) {
				start := g * region
				end := min(start+region, rwSize)
				wg.Go(func() {
					w.run(t, img, rand.New(rand.NewPCG(uint64(i), uint64(g+2))), start, end, 250)
				})
			}
			wg.Wait()
			w.verify(t, img)
			if err := img.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if t.Failed() {
				return
			}

			if err := os.WriteFile(filepath.Join(dir, "shadow.raw"), w.shadow, 0o644); err != nil {
				t.Fatal(err)
			}
			if r := run(t, dir, qemuImg, "check", "t.qcow2"); r.code != 0 {
				t.Errorf("qemu-img check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			if r := run(t, dir, qemuImg, "compare", "-f", "qcow2", "-F", "raw", "t.qcow2", "shadow.raw"); r.code != 0 {
				t.Errorf("qemu-img compare with the shadow: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
		})
	}
}

func openRW(t *testing.T, file string) formats.Image {
	t.Helper()
	img, err := formats.Open(file, formats.OpenOptions{Format: "qcow2"})
	if err != nil {
		t.Fatalf("open %s: %v", file, err)
	}
	if img.Size() != rwSize {
		t.Fatalf("size %d, want %d", img.Size(), rwSize)
	}
	return img
}

// randomWriter applies random operations to an image and to shadow.
// Concurrent callers work on disjoint ranges, so each shadow byte has one
// writer; the slices themselves are never reallocated.
type randomWriter struct {
	base   []byte // what a discarded range may read back as
	shadow []byte // what the image must read
}

// run applies n random operations within [start, end).
func (w *randomWriter) run(t *testing.T, img formats.Image, r *rand.Rand, start, end int64, n int) {
	zeroer, ok := img.(formats.Zeroer)
	if !ok {
		t.Errorf("%T does not implement formats.Zeroer", img)
		return
	}
	discarder, ok := img.(formats.Discarder)
	if !ok {
		t.Errorf("%T does not implement formats.Discarder", img)
		return
	}
	for range n {
		off, length := randomRange(r, start, end)
		var err error
		switch op := r.IntN(100); {
		case op < 68:
			buf := make([]byte, length)
			fillRandom(buf, r.Uint64())
			if _, err = img.WriteAt(buf, off); err == nil {
				copy(w.shadow[off:], buf)
			}
		case op < 86:
			mayUnmap := r.IntN(2) == 0
			if err = zeroer.WriteZeroes(off, length, mayUnmap); err == nil {
				clear(w.shadow[off : off+length])
			}
		case op < 98:
			if err = discarder.Discard(off, length); err == nil {
				err = w.afterDiscard(img, off, length)
			}
		default:
			// Flushes race with the other workers' writes.
			err = img.Flush()
		}
		if err != nil {
			t.Errorf("operation at %d+%d: %v", off, length, err)
			return
		}
	}
}

// randomRange picks an operation's range inside [start, end): mostly
// small and sector aligned, sometimes unaligned, sometimes large.
func randomRange(r *rand.Rand, start, end int64) (off, length int64) {
	switch r.IntN(4) {
	case 0: // unaligned, small
		length = 1 + r.Int64N(8*kib)
	case 1: // large
		length = 1 + r.Int64N(256*kib)
	default: // sector aligned
		length = 512 * (1 + r.Int64N(32))
	}
	length = min(length, end-start)
	off = start + r.Int64N(end-start-length+1)
	if length%512 == 0 {
		off -= (off - start) % 512
	}
	return off, length
}

// afterDiscard reads a discarded range back: every byte must read as
// before, as zero or as the backing image (QEMU may keep data it cannot
// drop whole clusters of), and the shadow learns which.
func (w *randomWriter) afterDiscard(img formats.Image, off, length int64) error {
	buf := make([]byte, length)
	if _, err := img.ReadAt(buf, off); err != nil {
		return fmt.Errorf("read after discard: %w", err)
	}
	for i, b := range buf {
		p := off + int64(i)
		if b != w.shadow[p] && b != 0 && b != w.base[p] {
			return fmt.Errorf("after discard, byte %d reads %#x; before %#x, backing %#x",
				p, b, w.shadow[p], w.base[p])
		}
	}
	copy(w.shadow[off:], buf)
	return nil
}

// verify reads the whole image and compares it with the shadow.
func (w *randomWriter) verify(t *testing.T, img formats.Image) {
	t.Helper()
	buf := make([]byte, rwSize)
	if _, err := img.ReadAt(buf, 0); err != nil {
		t.Fatalf("read back: %v", err)
	}
	if i := firstByteDiff(buf, w.shadow); i < len(buf) {
		t.Fatalf("read back: first difference at %d: %#x, want %#x", i, buf[i], w.shadow[i])
	}
}
