package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// writeCase is an image to write to: created by qemu-img (so that
// qemu-made metadata is exercised) or by this driver, optionally with a
// backing file and qemu-io commands run first.
type writeCase struct {
	name    string
	opts    string
	size    int64
	ours    bool     // create with this driver instead of qemu-img
	backing string   // qemu-io commands for a qcow2 backing image
	pre     []string // qemu-io commands on the image before the test
	snap    bool     // take an internal snapshot after pre
	ops     int      // random operations; 0 means 800
	// tinyCache holds one L2 table, so that every table change evicts
	// (writing back) and the next miss reuses the evicted buffer.
	tinyCache bool
}

func writeCases() []writeCase {
	return []writeCase{
		{name: "v3", size: 8 << 20},
		{name: "v3 ours", size: 8 << 20, ours: true},
		{name: "v2", opts: "compat=0.10", size: 8 << 20, ours: true},
		{name: "512 clusters 1-bit refcounts", opts: "cluster_size=512,refcount_bits=1", size: 4 << 20, ours: true},
		{name: "512 clusters 64-bit refcounts", opts: "cluster_size=512,refcount_bits=64", size: 4 << 20, ours: true},
		{name: "2M clusters", opts: "cluster_size=2M", size: 6 << 20, ours: true, ops: 150},
		{name: "extended l2", opts: "extended_l2=on,cluster_size=32k", size: 8 << 20, ours: true},
		{name: "extended l2 backing", opts: "extended_l2=on", size: 8 << 20, ours: true, backing: "write -P 0xaa 0 6M"},
		{name: "backing", size: 8 << 20, ours: true, backing: "write -P 0xaa 0 5M;write -z 1M 1M"},
		{name: "v2 backing", opts: "compat=0.10", size: 8 << 20, ours: true, backing: "write -P 0xbb 0 6M"},
		{name: "lazy refcounts", opts: "lazy_refcounts=on", size: 8 << 20, ours: true},
		{name: "data file", opts: "data_file=DATA", size: 8 << 20, ours: true},
		{name: "raw data file", opts: "data_file=DATA,data_file_raw=on", size: 8 << 20, ours: true},
		{name: "zstd compressed", opts: "compression_type=zstd", size: 8 << 20,
			pre: []string{"write -c -P 0x12 0 1M", "write -c -P 0x34 4M 2M"}},
		{name: "zlib compressed 4k", opts: "cluster_size=4k", size: 4 << 20,
			pre: []string{"write -c -P 0x12 0 1M", "write -P 0x34 2M 1M"}},
		{name: "snapshot", size: 8 << 20, pre: []string{"write -P 0x56 0 3M", "write -c -P 0x78 4M 1M"}, snap: true},
		{name: "metadata prealloc", opts: "preallocation=metadata", size: 8 << 20, ours: true},
		{name: "512 clusters tiny L2 cache", opts: "cluster_size=512", size: 4 << 20, ours: true, tinyCache: true},
		// Two 4 KiB segments per table (storeTable), three tables.
		{name: "8k clusters tiny L2 cache", opts: "cluster_size=8k", size: 24 << 20, ours: true, tinyCache: true, ops: 3000},
		{name: "snapshot 512 clusters tiny L2 cache", opts: "cluster_size=512", size: 4 << 20, tinyCache: true,
			pre: []string{"write -P 0x56 0 3M", "write -c -P 0x78 3M 512k"}, snap: true},
	}
}

// shadow mirrors the guest content an image must have.
type shadow struct {
	data    []byte
	backing []byte // nil without a backing file
	cluster int64
	v2      bool
}

func (s *shadow) write(p []byte, off int64) { copy(s.data[off:], p) }

// zero mirrors WriteZeroes: always zeroes.
func (s *shadow) zero(off, n int64) { clear(s.data[off : off+n]) }

// discard mirrors Discard: whole clusters only (the unaligned last
// cluster when the range reaches the end) read as zeroes; v2 images
// with a backing file ignore discards.
func (s *shadow) discard(off, n int64) {
	if s.v2 && s.backing != nil {
		return
	}
	size := int64(len(s.data))
	start := (off + s.cluster - 1) / s.cluster * s.cluster
	end := (off + n) / s.cluster * s.cluster
	if off+n == size {
		end = size
	}
	for i := start; i < end; i++ {
		s.data[i] = 0
	}
}

func buildWriteCase(t *testing.T, dir string, c writeCase) (string, *shadow) {
	t.Helper()
	name := filepath.Join(dir, "w.qcow2")
	opts := strings.ReplaceAll(c.opts, "DATA", filepath.Join(dir, "data.raw"))
	var back string
	if c.backing != "" {
		back = filepath.Join(dir, "back.qcow2")
		execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", back, "6M")
		qemuIO(t, back, strings.Split(c.backing, ";")...)
		opts = strings.Trim(opts+",backing_file="+back+",backing_fmt=qcow2", ",")
	}
	if c.ours {
		if err := createOpts(t, name, strings.Trim(opts+",size="+itoa(c.size), ",")); err != nil {
			t.Fatal(err)
		}
	} else {
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		execOut(t, "qemu-img", append(args, name, itoa(c.size))...)
	}
	if len(c.pre) > 0 {
		qemuIO(t, name, c.pre...)
	}
	if c.snap {
		execOut(t, "qemu-img", "snapshot", "-c", "snap1", name)
	}
	img := openImg(t, name, true)
	s := &shadow{data: readAll(t, img), cluster: img.lay.ClusterSize, v2: img.hdr.Version == 2}
	if img.backing != nil {
		s.backing = readAll(t, img.backing)
	}
	img.Close()
	return name, s
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestRandomWrites runs a few thousand random writes, zero writes and
// discards against a shadow copy, then requires the driver's reads, a
// clean qemu-img check and qemu-img compare against the shadow.
func TestRandomWrites(t *testing.T) {
	haveQemu(t)
	for _, c := range writeCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			name, s := buildWriteCase(t, dir, c)
			img := openImg(t, name, false)
			if c.tinyCache {
				img.l2Cache.max = 1
			}
			rng := rand.New(rand.NewSource(int64(len(c.name))))
			size := c.size
			ops := 800
			if c.ops != 0 {
				ops = c.ops
			}
			for i := 0; i < ops; i++ {
				off := rng.Int63n(size)
				n := 1 + rng.Int63n(min(size-off, []int64{512, 4096, 70000, 300000}[rng.Intn(4)]))
				if rng.Intn(3) == 0 {
					// Favour cluster-aligned requests.
					off = off / s.cluster * s.cluster
					n = min(size-off, (n+s.cluster-1)/s.cluster*s.cluster)
				}
				switch op := rng.Intn(10); {
				case op < 6:
					p := make([]byte, n)
					fill := byte(rng.Intn(255) + 1)
					for j := range p {
						p[j] = fill + byte(j>>9)
					}
					if _, err := img.WriteAt(p, off); err != nil {
						t.Fatalf("op %d write %d+%d: %v", i, off, n, err)
					}
					s.write(p, off)
				case op < 8:
					if err := img.WriteZeroes(off, n, op == 7); err != nil {
						t.Fatalf("op %d zero %d+%d: %v", i, off, n, err)
					}
					s.zero(off, n)
				default:
					if err := img.Discard(off, n); err != nil {
						t.Fatalf("op %d discard %d+%d: %v", i, off, n, err)
					}
					s.discard(off, n)
				}
				if i%500 == 499 {
					if err := img.Flush(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if got := readAll(t, img); !bytes.Equal(got, s.data) {
				t.Fatalf("driver reads differ from the shadow at %#x", diffOffset(got, s.data))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, name)
			raw := filepath.Join(dir, "shadow.raw")
			if err := os.WriteFile(raw, s.data, 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", name, raw).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
			if strings.Contains(c.opts, "data_file_raw=on") {
				// The data file itself must read as the guest content.
				if got, _ := os.ReadFile(filepath.Join(dir, "data.raw")); !bytes.Equal(got, s.data) {
					t.Errorf("raw data file differs at %#x", diffOffset(got, s.data))
				}
			}
		})
	}
}

// TestConcurrentWrites writes disjoint regions from many goroutines
// while others read, then checks content and consistency.
func TestConcurrentWrites(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "c.qcow2")
	if err := createOpts(t, name, "cluster_size=4k,size=16M"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, false)
	const workers = 8
	const region = 2 << 20
	want := make([]byte, workers*region)
	var wg sync.WaitGroup
	errs := make(chan error, 2*workers)
	for w := 0; w < workers; w++ {
		wg.Add(2)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			base := int64(w) * region
			for i := 0; i < 200; i++ {
				off := rng.Int63n(region - 10000)
				n := 1 + rng.Int63n(10000)
				p := bytes.Repeat([]byte{byte(w*16 + i%16 + 1)}, int(n))
				if _, err := img.WriteAt(p, base+off); err != nil {
					errs <- err
					return
				}
				copy(want[base+off:], p)
			}
		}(w)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, 65536)
			for i := 0; i < 100; i++ {
				if _, err := img.ReadAt(buf, int64((w*7919+i*104729)%(workers*region-65536))); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := readAll(t, img)[:len(want)]; !bytes.Equal(got, want) {
		t.Fatalf("content differs at %#x", diffOffset(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, name)
}

// TestConcurrentCOW overwrites compressed clusters (copy on write that
// frees host space) while other goroutines read the same clusters.
func TestConcurrentCOW(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "cow.qcow2")
	if err := createOpts(t, name, "cluster_size=4k,size=1M"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, false)
	cs := img.CompressionUnit()
	n := img.Size() / cs
	for i := int64(0); i < n; i++ {
		o, ok := img.Compress(nil, bytes.Repeat([]byte{byte(i)}, int(cs)))
		if !ok {
			t.Fatal("did not compress")
		}
		if err := img.WriteCompressed(i*cs, o); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 4; w++ {
		wg.Add(2)
		go func(w int) {
			defer wg.Done()
			for i := int64(w); i < n; i += 4 {
				if _, err := img.WriteAt([]byte{0xff}, i*cs+100); err != nil {
					errs <- err
					return
				}
			}
		}(w)
		go func() {
			defer wg.Done()
			buf := make([]byte, 3*cs)
			for i := int64(0); i+3 <= n; i++ {
				if _, err := img.ReadAt(buf, i*cs); err != nil {
					errs <- err
					return
				}
				for j, b := range buf {
					c := i + int64(j)/cs
					if b != byte(c) && !(int64(j)%cs == 100 && b == 0xff) {
						errs <- fmt.Errorf("cluster %d byte %d reads %#x", c, int64(j)%cs, b)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, name)
}

// TestSparseNewTables: an L2 table allocated past the end of the file is
// written only where it has entries, plus its last segment so that the
// file covers it; a segment written once is written again when its
// entries are all zero again, or the old entry would come back.
func TestSparseNewTables(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "s.qcow2")
	// Version 2 has no zero flag: the discard below leaves a zero entry.
	if err := createOpts(t, name, "size=1G,compat=0.10"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, false)
	const seg = 4096
	const guest = 600 << 16 // L2 entry 600 of 8192: segment 1 of 16
	if _, err := img.WriteAt(bytes.Repeat([]byte{0x5a}, 1<<16), guest); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	l2 := int64(img.l1[0] & OffsetMask)
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	for _, c := range []struct {
		whence   int
		from, to int64
	}{
		{unix.SEEK_DATA, l2, l2 + seg},         // segment 0 is a hole
		{unix.SEEK_HOLE, l2 + seg, l2 + 2*seg}, // segment 1 holds the entry
		{unix.SEEK_DATA, l2 + 2*seg, l2 + 15*seg},
	} {
		if got, err := unix.Seek(fd, c.from, c.whence); err != nil || got != c.to {
			t.Errorf("lseek(%#x, whence %d) = %#x, %v; want %#x", c.from, c.whence, got, err, c.to)
		}
	}
	if err := img.Discard(guest, 1<<16); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	var e [8]byte
	if _, err := f.ReadAt(e[:], l2+600*8); err != nil || e != [8]byte{} {
		t.Errorf("L2 entry on disk after the discard = %x, %v; want zero", e, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, name)
}

// TestMetadataAtSorted compares the overlap check's lookups in the
// sorted offsets with a scan of the L1 and refcount tables while setL1
// (kept up to date) and whole-table changes (tablesChanged) move tables
// around.
func TestMetadataAtSorted(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "m.qcow2")
	if err := createOpts(t, name, "size=64M,cluster_size=4k"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, false)
	defer img.Close()
	cs := uint64(img.lay.ClusterSize)
	scan := func(off, n uint64) string {
		hit := func(table []uint64) bool {
			for _, e := range table {
				if h := e & OffsetMask; h != 0 && h < off+n && off < h+cs {
					return true
				}
			}
			return false
		}
		switch {
		case hit(img.reftable):
			return "refcount block"
		case hit(img.l1):
			return "active L2 table"
		}
		return ""
	}
	rng := rand.New(rand.NewSource(1))
	const far = 1 << 30 // past the header, L1 and refcount tables
	host := func() uint64 { return far + uint64(rng.Intn(4096))*cs/2 }
	for i := 0; i < 3000; i++ {
		switch rng.Intn(20) {
		case 0:
			img.reftable[1+rng.Intn(len(img.reftable)-1)] = host() &^ (cs - 1)
			img.tablesChanged()
		default:
			e := uint64(0)
			if rng.Intn(3) > 0 {
				e = host() | OflagCopied
			}
			if err := img.setL1(int64(rng.Intn(len(img.l1))), e); err != nil {
				t.Fatal(err)
			}
		}
		off, n := host()+uint64(rng.Intn(int(cs))), 1+uint64(rng.Intn(int(3*cs)))
		if got, want := img.metadataAt(off, n), scan(off, n); got != want {
			t.Fatalf("step %d: metadataAt(%#x, %#x) = %q, a scan finds %q", i, off, n, got, want)
		}
	}
}
