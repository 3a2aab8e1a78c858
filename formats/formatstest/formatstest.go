// Package formatstest is the conformance suite every image format driver
// runs from its tests: it checks a driver's formats.Image against a
// shadow buffer holding what the guest should see.
//
// A driver hooks it in with one test, once per interesting set of
// creation options:
//
//	func TestConformance(t *testing.T) {
//		formatstest.Run(t, formatstest.Created("qcow2", "cluster_size=4k"))
//	}
//
// Run checks, each on a fresh image: reads of a new image, read-after-write
// at unaligned offsets and lengths and across cluster boundaries, reads
// and writes at and past Size, concurrent writers and readers on disjoint
// ranges, WriteZeroes and Discard when the image has them, BlockStatus
// consistency, Resize when the image has it, and that Flush, Close and a
// reopen (formats.Open with the image's Format and Filename) keep the
// content, also read-only.
package formatstest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// Size is the virtual size Run asks newImage for: a whole number of
// sectors, but not of 64 KiB clusters, so the last cluster is partial.
const Size = 4<<20 + 3*512

// NewImage creates an image of size bytes that reads as zeroes, opens it
// read-write and returns it. The suite closes it. The image must be
// reopenable with formats.Open(img.Filename(), formats.OpenOptions{Format:
// img.Format()}).
type NewImage func(t *testing.T, size int64) formats.Image

// Created returns a NewImage that makes images with the registered
// driver format and the -o option list opts (without size), in
// t.TempDir(), and opens them read-write with the format given.
func Created(format, opts string) NewImage {
	return func(t *testing.T, size int64) formats.Image {
		t.Helper()
		list := "size=" + strconv.FormatInt(size, 10)
		if opts != "" {
			list = opts + "," + list
		}
		name := filepath.Join(t.TempDir(), "conformance."+format)
		if err := Create(t, format, name, list); err != nil {
			t.Fatalf("create %s: %v", format, err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: format})
		if err != nil {
			t.Fatalf("open %s: %v", name, err)
		}
		return img
	}
}

// Run runs the conformance suite as subtests of t.
func Run(t *testing.T, newImage NewImage) { RunOpen(t, newImage, formats.OpenOptions{}) }

// RunOpen is Run for images that need more than their format to be
// reopened, such as an encrypted image's key: the suite reopens them with
// open, its Format and ReadOnly set.
func RunOpen(t *testing.T, newImage NewImage, open formats.OpenOptions) {
	tests := []struct {
		name string
		run  func(t *testing.T, c *checker)
	}{
		{"Fresh", testFresh},
		{"ReadAfterWrite", testReadAfterWrite},
		{"PastSize", testPastSize},
		{"Concurrent", testConcurrent},
		{"WriteZeroes", testWriteZeroes},
		{"Discard", testDiscard},
		{"BlockStatus", testBlockStatus},
		{"Resize", testResize},
		{"Reopen", testReopen},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Each check has its own image; running them side by side
			// also tests that separate images share nothing unsafely.
			t.Parallel()
			img := newImage(t, Size)
			c := &checker{t: t, img: img, shadow: make([]byte, Size), open: open,
				rng: rand.New(rand.NewPCG(1, uint64(len(tc.name))))}
			t.Cleanup(func() {
				if c.img != nil {
					c.img.Close()
				}
			})
			if got := img.Size(); got != Size {
				t.Fatalf("Size() = %d, want %d", got, Size)
			}
			tc.run(t, c)
		})
	}
}

// checker pairs an image with the bytes it should read as.
type checker struct {
	t      *testing.T
	img    formats.Image
	shadow []byte
	rng    *rand.Rand
	// open is how testReopen reopens the image.
	open formats.OpenOptions
}

// cluster is the allocation unit to aim writes across: the image's
// cluster size when it reports one, else 64 KiB. The checks place
// writes up to eight clusters in, so larger clusters (blocks of vdi, vpc
// and vhdx images, 1 MiB and more) fall back to 64 KiB too; long writes
// still cross their boundaries.
func (c *checker) cluster() int64 {
	if d, ok := c.img.(formats.Describer); ok {
		if desc, err := d.Describe(); err == nil && desc.ClusterSize > 0 && desc.ClusterSize <= Size/8 {
			return desc.ClusterSize
		}
	}
	return 64 << 10
}

// write writes random bytes at [off, off+n) and records them.
func (c *checker) write(off, n int64) {
	c.t.Helper()
	buf := randomBytes(c.rng, n)
	if got, err := c.img.WriteAt(buf, off); err != nil || got != len(buf) {
		c.t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", n, off, got, err)
	}
	copy(c.shadow[off:], buf)
}

// randomBytes returns n bytes from rng.
func randomBytes(rng *rand.Rand, n int64) []byte {
	buf := make([]byte, (n+7)/8*8)
	for i := 0; i < len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], rng.Uint64())
	}
	return buf[:n]
}

// verify reads the whole image and compares it with the shadow.
func (c *checker) verify() {
	c.t.Helper()
	verifyImage(c.t, c.img, c.shadow)
}

// verifyImage compares every byte of img with want, in chunks.
func verifyImage(t *testing.T, img formats.Image, want []byte) {
	t.Helper()
	if got := img.Size(); got != int64(len(want)) {
		t.Fatalf("Size() = %d, want %d", got, len(want))
	}
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	for off := int64(0); off < int64(len(want)); off += chunk {
		n := min(chunk, int64(len(want))-off)
		if got, err := img.ReadAt(buf[:n], off); err != nil || got != int(n) {
			t.Fatalf("ReadAt(%d bytes, %d) = %d, %v", n, off, got, err)
		}
		if i := mismatch(buf[:n], want[off:off+n]); i >= 0 {
			t.Fatalf("byte %d reads %#x, want %#x", off+int64(i), buf[i], want[off+int64(i)])
		}
	}
}

// mismatch returns the index of the first differing byte, or -1.
func mismatch(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// firstNonZero returns the index of the first non-zero byte, or -1.
func firstNonZero(b []byte) int {
	for i, v := range b {
		if v != 0 {
			return i
		}
	}
	return -1
}

func testFresh(t *testing.T, c *checker) {
	c.verify()
	checkBlockStatus(t, c.img)
}

func testReadAfterWrite(t *testing.T, c *checker) {
	cl := c.cluster()
	cases := []struct{ off, n int64 }{
		{0, 1},
		{1, 511},
		{511, 2},
		{513, 1000},
		{cl - 1, 2},                // one byte each side of a cluster boundary
		{cl - 100, cl + 200},       // spans three clusters
		{3*cl + 7, 5*cl - 13},      // several whole clusters, unaligned ends
		{Size / 2, 4097},           // middle of the image
		{Size - cl - 3, cl + 3},    // into the partial last cluster
		{Size - 1, 1},              // last byte
		{Size - 513, 513},          // last sector and one byte before
		{cl + 5, 10},               // overwrite inside data written above
		{cl - 50, 100},             // overwrite across a boundary again
		{Size - 4096, 4096},        // overwrite the tail
		{2*cl - 1, 1},              // single byte before a boundary
		{0, 3*cl + 1},              // from the start over three boundaries
		{Size / 3, Size/3 + 12345}, // a long unaligned run
	}
	for _, tc := range cases {
		c.write(tc.off, tc.n)
		// Read back exactly the range, then one unaligned window around it.
		buf := make([]byte, tc.n)
		if got, err := c.img.ReadAt(buf, tc.off); err != nil || got != len(buf) {
			t.Fatalf("ReadAt(%d bytes, %d) = %d, %v", tc.n, tc.off, got, err)
		}
		if i := mismatch(buf, c.shadow[tc.off:tc.off+tc.n]); i >= 0 {
			t.Fatalf("after WriteAt(%d bytes, %d): byte %d differs", tc.n, tc.off, tc.off+int64(i))
		}
		lo, hi := max(tc.off-3, 0), min(tc.off+tc.n+5, Size)
		buf = make([]byte, hi-lo)
		if _, err := c.img.ReadAt(buf, lo); err != nil {
			t.Fatalf("ReadAt(%d bytes, %d): %v", hi-lo, lo, err)
		}
		if i := mismatch(buf, c.shadow[lo:hi]); i >= 0 {
			t.Fatalf("after WriteAt(%d bytes, %d): byte %d differs", tc.n, tc.off, lo+int64(i))
		}
	}
	c.verify()
	checkBlockStatus(t, c.img)
}

func testPastSize(t *testing.T, c *checker) {
	c.write(Size-100, 100)
	buf := make([]byte, 300)
	n, err := c.img.ReadAt(buf, Size-100)
	if n != 100 || err != io.EOF {
		t.Errorf("ReadAt straddling Size = %d, %v; want 100, io.EOF", n, err)
	}
	if !bytes.Equal(buf[:100], c.shadow[Size-100:]) {
		t.Errorf("ReadAt straddling Size returned wrong data")
	}
	for _, off := range []int64{Size, Size + 1, Size + 1<<30} {
		if n, err := c.img.ReadAt(buf, off); n != 0 || err != io.EOF {
			t.Errorf("ReadAt at %d = %d, %v; want 0, io.EOF", off, n, err)
		}
	}
	if n, err := c.img.ReadAt(buf, -1); err == nil {
		t.Errorf("ReadAt at -1 = %d, nil; want an error", n)
	}
	// Writes that do not fit fail as a whole and change nothing.
	for _, tc := range []struct{ off, n int64 }{{Size - 10, 20}, {Size, 1}, {Size + 4096, 512}, {-1, 2}} {
		if _, err := c.img.WriteAt(make([]byte, tc.n), tc.off); err == nil {
			t.Errorf("WriteAt(%d bytes, %d) past Size succeeded", tc.n, tc.off)
		}
	}
	if got := c.img.Size(); got != Size {
		t.Fatalf("Size() = %d after writes past it, want %d", got, Size)
	}
	// An empty read or write at Size is not an error worth failing on
	// either way, but it must not change anything.
	c.img.WriteAt(nil, Size)
	c.verify()
}

func testConcurrent(t *testing.T, c *checker) {
	// Workers own disjoint, unaligned stripes; neighbouring stripes share
	// clusters so that allocation of one cluster races between workers.
	const workers = 16
	stripe := int64(Size / workers)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		lo := int64(w)*stripe + int64(w*37%511)
		hi := min(int64(w+1)*stripe+int64((w+1)*37%511), Size)
		if w == workers-1 {
			hi = Size
		}
		wg.Add(1)
		go func(w int, lo, hi int64) {
			defer wg.Done()
			errs <- worker(c.img, c.shadow[lo:hi], lo, rand.New(rand.NewPCG(uint64(w), 7)))
		}(w, lo, hi)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		return
	}
	c.verify()
	checkBlockStatus(t, c.img)
}

// worker writes and reads random pieces of [base, base+len(shadow)),
// keeping shadow (its own slice of the suite's shadow) up to date, and
// checks every read against it.
func worker(img formats.Image, shadow []byte, base int64, rng *rand.Rand) error {
	for range 40 {
		off := rng.Int64N(int64(len(shadow)))
		n := 1 + rng.Int64N(min(int64(len(shadow))-off, 100_000))
		if rng.IntN(3) > 0 {
			buf := randomBytes(rng, n)
			if _, err := img.WriteAt(buf, base+off); err != nil {
				return fmt.Errorf("WriteAt(%d bytes, %d): %w", n, base+off, err)
			}
			copy(shadow[off:], buf)
			continue
		}
		buf := make([]byte, n)
		if _, err := img.ReadAt(buf, base+off); err != nil {
			return fmt.Errorf("ReadAt(%d bytes, %d): %w", n, base+off, err)
		}
		if i := mismatch(buf, shadow[off:off+n]); i >= 0 {
			return fmt.Errorf("concurrent ReadAt(%d bytes, %d): byte %d differs", n, base+off, base+off+int64(i))
		}
	}
	return nil
}

// zeroCases are unaligned ranges for WriteZeroes and Discard, relative
// to the cluster size.
func zeroCases(cl int64) []struct{ off, n int64 } {
	return []struct{ off, n int64 }{
		{0, 1},
		{100, 300},
		{cl - 7, 14},
		{2 * cl, cl},                  // exactly one cluster
		{4*cl + 1, 3*cl - 2},          // whole clusters with partial ends
		{Size - cl - 1000, cl + 1000}, // to the end
		{Size / 2, 1},
	}
}

func testWriteZeroes(t *testing.T, c *checker) {
	z, ok := c.img.(formats.Zeroer)
	if !ok {
		t.Skip("image does not implement formats.Zeroer")
	}
	c.write(0, Size)
	for i, tc := range zeroCases(c.cluster()) {
		if err := z.WriteZeroes(tc.off, tc.n, i%2 == 0); err != nil {
			t.Fatalf("WriteZeroes(%d, %d, %v): %v", tc.off, tc.n, i%2 == 0, err)
		}
		clear(c.shadow[tc.off : tc.off+tc.n])
	}
	c.verify()
	checkBlockStatus(t, c.img)
	// Data written over zeroed ranges reads back.
	c.write(c.cluster()-3, 6)
	c.verify()
	if err := z.WriteZeroes(Size-10, 20, false); err == nil {
		t.Errorf("WriteZeroes past Size succeeded")
	}
}

func testDiscard(t *testing.T, c *checker) {
	d, ok := c.img.(formats.Discarder)
	if !ok {
		t.Skip("image does not implement formats.Discarder")
	}
	c.write(0, Size)
	cl := c.cluster()
	for _, tc := range zeroCases(cl) {
		if err := d.Discard(tc.off, tc.n); err != nil {
			t.Fatalf("Discard(%d, %d): %v", tc.off, tc.n, err)
		}
		// Without a backing image the whole clusters of a discarded
		// range read as zeroes. Discard is a hint, as in QEMU, so the
		// partial clusters at its ends may keep their data (qcow2 does)
		// or read as zeroes (raw punches a hole).
		got := make([]byte, tc.n)
		if _, err := c.img.ReadAt(got, tc.off); err != nil {
			t.Fatalf("ReadAt(%d bytes, %d): %v", tc.n, tc.off, err)
		}
		lo, hi := (tc.off+cl-1)/cl*cl, (tc.off+tc.n)/cl*cl
		for i, b := range got {
			pos := tc.off + int64(i)
			if b != 0 && (pos >= lo && pos < hi || b != c.shadow[pos]) {
				t.Fatalf("after Discard(%d, %d): byte %d reads %#x, want 0 (or %#x outside whole clusters)",
					tc.off, tc.n, pos, b, c.shadow[pos])
			}
		}
		copy(c.shadow[tc.off:], got)
	}
	c.verify()
	checkBlockStatus(t, c.img)
}

func testBlockStatus(t *testing.T, c *checker) {
	cl := c.cluster()
	c.write(cl+100, 2*cl)
	c.write(Size-700, 700)
	if z, ok := c.img.(formats.Zeroer); ok {
		c.write(5*cl, 2*cl)
		if err := z.WriteZeroes(5*cl, cl, true); err != nil {
			t.Fatalf("WriteZeroes: %v", err)
		}
		clear(c.shadow[5*cl : 6*cl])
	}
	checkBlockStatus(t, c.img)
	// Requests starting anywhere, of any length, stay inside what was asked
	// and inside the image.
	for _, off := range []int64{0, 1, cl - 1, cl + 100, Size / 2, Size - 701, Size - 1} {
		for _, n := range []int64{1, 511, cl, Size} {
			e, err := c.img.BlockStatus(off, n)
			if err != nil {
				t.Fatalf("BlockStatus(%d, %d): %v", off, n, err)
			}
			if e.Length <= 0 || e.Length > n || off+e.Length > Size {
				t.Errorf("BlockStatus(%d, %d) length %d, want 1..%d", off, n, e.Length, min(n, Size-off))
			}
		}
	}
	c.verify()
}

// checkBlockStatus walks the whole image: extents are contiguous, non
// empty, cover [0, Size) exactly, and ranges reported as zeroes, or not
// allocated in an image without backing, read as zeroes.
func checkBlockStatus(t *testing.T, img formats.Image) {
	t.Helper()
	size := img.Size()
	var backed bool
	if b, ok := img.(formats.Backed); ok && b.Backing() != nil {
		backed = true
	}
	for off := int64(0); off < size; {
		e, err := img.BlockStatus(off, size-off)
		if err != nil {
			t.Fatalf("BlockStatus(%d, %d): %v", off, size-off, err)
		}
		if e.Length <= 0 || off+e.Length > size {
			t.Fatalf("BlockStatus(%d, %d) length %d: empty or past Size %d", off, size-off, e.Length, size)
		}
		if e.Status&formats.StatusZero != 0 || !e.Status.Allocated() && !backed {
			buf := make([]byte, min(e.Length, 8<<20))
			for pos := off; pos < off+e.Length; pos += int64(len(buf)) {
				n := min(int64(len(buf)), off+e.Length-pos)
				if _, err := img.ReadAt(buf[:n], pos); err != nil {
					t.Fatalf("ReadAt(%d bytes, %d): %v", n, pos, err)
				}
				if i := firstNonZero(buf[:n]); i >= 0 {
					t.Fatalf("extent [%d, +%d) status %#x reads non-zero at %d", off, e.Length, e.Status, pos+int64(i))
				}
			}
		}
		if e.Status&formats.StatusOffsetValid != 0 && e.File == "" {
			t.Errorf("extent [%d, +%d) has a valid offset but no file", off, e.Length)
		}
		off += e.Length
	}
	if e, err := img.BlockStatus(size, 1); err == nil && e.Length != 0 {
		t.Errorf("BlockStatus(Size, 1) length %d, want 0", e.Length)
	}
}

func testResize(t *testing.T, c *checker) {
	r, ok := c.img.(formats.Resizer)
	if !ok {
		t.Skip("image does not implement formats.Resizer")
	}
	c.write(Size-1000, 1000)
	grown := int64(Size + 3<<20)
	if err := r.Resize(grown, "off", false); err != nil {
		t.Fatalf("Resize(%d): %v", grown, err)
	}
	c.shadow = append(c.shadow, make([]byte, grown-Size)...)
	if z, ok := c.img.(formats.ZeroInitReporter); ok && !z.HasZeroInit() {
		// As when new, a grown range of such an image (LUKS) reads as
		// noise until written.
		if _, err := c.img.WriteAt(make([]byte, grown-Size), Size); err != nil {
			t.Fatalf("zeroing the grown range: %v", err)
		}
	}
	c.verify()
	c.write(grown-512, 512)
	c.verify()
	checkBlockStatus(t, c.img)
	shrunk := int64(Size - 3*512)
	if err := r.Resize(shrunk, "off", true); err != nil {
		t.Logf("Resize(%d, shrink): %v; not checking shrinking", shrunk, err)
		return
	}
	c.shadow = c.shadow[:shrunk]
	c.verify()
	if n, err := c.img.ReadAt(make([]byte, 10), shrunk); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at new Size = %d, %v; want 0, io.EOF", n, err)
	}
	checkBlockStatus(t, c.img)
}

func testReopen(t *testing.T, c *checker) {
	cl := c.cluster()
	c.write(0, 1000)
	c.write(cl-10, 3*cl)
	c.write(Size-cl/2, cl/2)
	if z, ok := c.img.(formats.Zeroer); ok {
		if err := z.WriteZeroes(cl+5, 100, false); err != nil {
			t.Fatalf("WriteZeroes: %v", err)
		}
		clear(c.shadow[cl+5 : cl+105])
	}
	if err := c.img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	name, format := c.img.Filename(), c.img.Format()
	err := c.img.Close()
	c.img = nil
	if err != nil {
		t.Fatalf("Close: %v", err)
	}
	oo := c.open
	oo.Format = format
	img, err := formats.Open(name, oo)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	c.img = img
	c.verify()
	checkBlockStatus(t, img)
	c.write(cl*2+1, 77)
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c.img = nil

	oo.ReadOnly = true
	ro, err := formats.Open(name, oo)
	if err != nil {
		t.Fatalf("reopen read-only: %v", err)
	}
	c.img = ro
	c.verify()
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, formats.ErrReadOnly) {
		t.Errorf("WriteAt on a read-only image: %v, want formats.ErrReadOnly", err)
	}
	c.verify()
}
