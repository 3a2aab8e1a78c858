// Package qed is the QEMU Enhanced Disk format as block/qed*.c reads and
// writes it (docs/interop/qed_spec.txt): a little-endian header, a
// backing file name inside the header clusters, and two levels of
// tables (L1 and L2) of table_size clusters each, whose entries are
// cluster offsets, 0 for unallocated or 1 for a cluster of zeroes.
// Clusters and tables are allocated at the end of the file and never
// freed. An allocating write writes its data before the tables that
// point to it; without a backing file the need-check feature bit is set
// first, so that an image a crash left inconsistent is checked and
// repaired on its next read-write open.
package qed

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "qed",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
	})
}

// probe is bdrv_qed_probe: the magic decides.
func probe(buf []byte, _ string) int {
	if len(buf) >= headerSize && binary.LittleEndian.Uint32(buf) == magic {
		return 100
	}
	return 0
}

// Cache bounds: at most l2CacheTables L2 tables and l2CacheBytes bytes.
const (
	l2CacheTables = 64
	l2CacheBytes  = 64 << 20
)

// Image is an open QED image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	size     int64

	clusterSize  int64
	clusterBits  uint
	tableEntries int64 // entries of one table
	tableBits    uint  // log2(tableEntries)

	backingName, backingFormat string
	backing                    formats.Image

	// mu guards hdr, l1, the L2 cache and fileSize. Lookups hold it
	// while they read tables; allocating writes hold it for the whole
	// allocation (data, tables and header), as QEMU serialises them.
	mu  sync.Mutex
	hdr *Header
	l1  []uint64
	l2  map[uint64][]uint64
	// l2Order lists cached tables oldest first, for eviction.
	l2Order []uint64
	// fileSize is where the next cluster goes: the file's size rounded
	// down to a cluster at open, then grown by every allocation.
	fileSize int64
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Backed    = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
	_ formats.Checker   = (*Image)(nil)
	_ formats.Zeroer    = (*Image)(nil)
)

var errIO = formats.ErrnoError{Err: syscall.EIO}

// errInvalid is QEMU's -EINVAL for a table entry pointing outside the
// file or at a partial cluster. qemu-img prints only strerror for it
// (e.g. "Could not read file metadata: Invalid argument"), so this
// error reads the same; it matches formats.ErrCorrupt and
// syscall.EINVAL. qemu-img check names the bad entries.
var errInvalid error = invalidError{}

type invalidError struct{}

func (invalidError) Error() string   { return formats.ErrnoError{Err: syscall.EINVAL}.Error() }
func (invalidError) Unwrap() []error { return []error{formats.ErrCorrupt, syscall.EINVAL} }

// open is bdrv_qed_do_open: validate the header, clear unknown autoclear
// bits, read the L1 table, check and repair an image that needs it (when
// opened read-write and not for qemu-img check), and open the backing
// image.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	if img.backingName != "" && !o.NoBacking {
		b, err := formats.OpenBacking(f.Name(), img.backingName, img.backingFormat, o)
		if err != nil {
			f.Close()
			return nil, err
		}
		img.backing = b
	}
	return img, nil
}

func load(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	buf := make([]byte, headerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	h := decodeHeader(buf)
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	if h.Magic == magic && validClusterSize(uint64(h.ClusterSize)) {
		fileSize &^= int64(h.ClusterSize) - 1
	}
	if err := h.validate(fileSize); err != nil {
		return nil, err
	}
	img := &Image{
		f:            f,
		readOnly:     f.ReadOnly(),
		size:         int64(h.ImageSize),
		clusterSize:  int64(h.ClusterSize),
		clusterBits:  uint(bits.TrailingZeros32(h.ClusterSize)),
		tableEntries: h.tableBytes() / 8,
		tableBits:    uint(bits.TrailingZeros64(uint64(h.tableBytes() / 8))),
		hdr:          h,
		l2:           map[uint64][]uint64{},
		fileSize:     fileSize,
	}
	if h.Features&featBackingFile != 0 {
		name := make([]byte, h.BackingFilenameSize)
		if _, err := f.ReadAt(name, int64(h.BackingFilenameOffset)); err != nil {
			return nil, formats.Errorf(formats.ErrCorrupt, "Failed to read backing filename")
		}
		img.backingName = string(name)
		if h.Features&featBackingNoProbe != 0 {
			img.backingFormat = "raw"
		}
	}
	writable := !img.readOnly
	if h.AutoclearFeatures != 0 && writable {
		// No autoclear feature is known: clear them all, so that a newer
		// program sees its feature's data may be stale.
		h.AutoclearFeatures = 0
		if err := img.writeHeader(); err != nil {
			return nil, fmt.Errorf("Failed to update header: %w", err)
		}
	}
	if img.l1, err = img.readTable(h.L1TableOffset); err != nil {
		return nil, fmt.Errorf("Failed to read L1 table: %w", err)
	}
	if h.Features&featNeedCheck != 0 && writable && !o.Check {
		if _, err := img.check(formats.CheckFixAll); err != nil {
			return nil, fmt.Errorf("Image corrupted: %w", err)
		}
	}
	return img, nil
}

func (img *Image) Size() int64      { return img.size }
func (img *Image) Format() string   { return "qed" }
func (img *Image) Filename() string { return img.f.Name() }

// Backing returns the open backing image, or nil.
func (img *Image) Backing() formats.Image { return img.backing }

// BackingInfo returns the backing file name and "raw" when the header
// says not to probe it.
func (img *Image) BackingInfo() (string, string) { return img.backingName, img.backingFormat }

// Describe reports the cluster size. QEMU 7.2 reports the dirty flag
// as false even when the need-check bit is set.
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{ClusterSize: img.clusterSize, HasDirtyFlag: true}, nil
}

// writeHeader writes the header's known fields in place, leaving the
// backing file name and anything else after them alone, and makes it
// durable. The caller holds mu (or is opening the image).
func (img *Image) writeHeader() error {
	if _, err := img.f.WriteAt(img.hdr.encode(), 0); err != nil {
		return fmt.Errorf("%s: writing the QED header: %w", img.f.Name(), err)
	}
	return img.f.Sync()
}

// readTable reads the L1 or L2 table at host offset off.
func (img *Image) readTable(off uint64) ([]uint64, error) {
	raw := make([]byte, img.hdr.tableBytes())
	if _, err := img.f.ReadAt(raw, int64(off)); err != nil {
		return nil, fmt.Errorf("%s: reading QED table at %#x: %w", img.f.Name(), off, err)
	}
	t := make([]uint64, img.tableEntries)
	for i := range t {
		t[i] = binary.LittleEndian.Uint64(raw[8*i:])
	}
	return t, nil
}

// writeEntries writes entries [i, i+n) of the table t at host offset off.
func (img *Image) writeEntries(t []uint64, off uint64, i, n int64) error {
	raw := make([]byte, 8*n)
	for j := range n {
		binary.LittleEndian.PutUint64(raw[8*j:], t[i+j])
	}
	_, err := img.f.WriteAt(raw, int64(off)+8*i)
	return err
}

// l2Table returns the L2 table at host offset off, checked as
// qed_read_l2_table does. The caller holds mu.
func (img *Image) l2Table(off uint64) ([]uint64, error) {
	if t, ok := img.l2[off]; ok {
		return t, nil
	}
	if !img.hdr.validTableOffset(off, img.fileSize) {
		return nil, errInvalid
	}
	t, err := img.readTable(off)
	if err != nil {
		return nil, err
	}
	img.cacheL2(off, t)
	return t, nil
}

// cacheL2 adds a table to the cache, evicting the oldest beyond the
// bounds. The caller holds mu.
func (img *Image) cacheL2(off uint64, t []uint64) {
	for len(img.l2Order) > 0 && (len(img.l2Order) >= l2CacheTables ||
		int64(len(img.l2Order)+1)*img.hdr.tableBytes() > l2CacheBytes) {
		delete(img.l2, img.l2Order[0])
		img.l2Order = img.l2Order[1:]
	}
	img.l2[off] = t
	img.l2Order = append(img.l2Order, off)
}

// Kinds of cluster a run can consist of.
type kind int

const (
	unallocated kind = iota
	zero
	data
)

// extent is a stretch of guest bytes of one kind inside one L2 table;
// data runs are contiguous in the file from host.
type extent struct {
	kind   kind
	host   int64 // of the first byte, for data runs
	length int64
}

// findRun is qed_find_cluster with qed_count_contiguous_clusters: the
// run starting at guest offset pos, at most n bytes long. The caller
// holds mu.
func (img *Image) findRun(pos, n int64) (extent, error) {
	span := img.clusterSize << img.tableBits // guest bytes of one L2 table
	n = min(n, span-pos%span)
	l2off := img.l1[pos>>(img.clusterBits+img.tableBits)]
	if l2off == 0 {
		return extent{kind: unallocated, length: n}, nil
	}
	t, err := img.l2Table(l2off)
	if err != nil {
		return extent{}, err
	}
	i := (pos >> img.clusterBits) & (img.tableEntries - 1)
	first, err := img.classify(t[i])
	if err != nil {
		return extent{}, err
	}
	inCluster := pos & (img.clusterSize - 1)
	r := extent{kind: first, length: min(n, img.clusterSize-inCluster)}
	if first == data {
		r.host = int64(t[i]) + inCluster
	}
	for j := i + 1; r.length < n && j < img.tableEntries; j++ {
		k, err := img.classify(t[j])
		if err != nil || k != first || k == data && int64(t[j]) != int64(t[j-1])+img.clusterSize {
			break
		}
		r.length += min(n-r.length, img.clusterSize)
	}
	return r, nil
}

// classify tells an L2 entry's kind, refusing offsets outside the file.
func (img *Image) classify(e uint64) (kind, error) {
	switch {
	case e == 0:
		return unallocated, nil
	case e == zeroCluster:
		return zero, nil
	case !img.hdr.validClusterOffset(e, img.fileSize):
		return 0, errInvalid
	}
	return data, nil
}

// ReadAt reads guest bytes: data clusters from the file, zero clusters
// as zeroes, unallocated ones from the backing image (zeroes past its
// end or without one).
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d: %w", img.f.Name(), off, errIO)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), img.size-off)
	for done := int64(0); done < n; {
		img.mu.Lock()
		r, err := img.findRun(off+done, n-done)
		img.mu.Unlock()
		if err != nil {
			return int(done), err
		}
		buf := p[done : done+r.length]
		switch r.kind {
		case unallocated:
			err = formats.ReadBacking(img.backing, buf, off+done)
		case zero:
			clear(buf)
		case data:
			_, err = img.f.ReadAt(buf, r.host)
		}
		if err != nil {
			return int(done), err
		}
		done += r.length
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes guest bytes. A write that does not fit in Size fails
// as a whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := img.write(off, int64(len(p)), p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes is bdrv_qed_co_pwrite_zeroes with the block layer's
// fallback: whole clusters become zero clusters (or get zeroes written
// in place when allocated), unaligned heads and tails are written as
// zeroes. QED cannot deallocate, so mayUnmap changes nothing.
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	start := min(alignUp(off, img.clusterSize), off+length)
	end := max(off+length&^(img.clusterSize-1), start)
	for _, piece := range []struct {
		off, n int64
		zero   bool
	}{{off, start - off, false}, {start, end - start, true}, {end, off + length - end, false}} {
		if piece.n == 0 {
			continue
		}
		var p []byte
		if !piece.zero {
			p = make([]byte, piece.n)
		}
		if err := img.write(piece.off, piece.n, p); err != nil {
			return err
		}
	}
	return nil
}

func (img *Image) checkWrite(off, n int64) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if off < 0 || n < 0 || off > img.size || n > img.size-off {
		return fmt.Errorf("%s: write of %d bytes at offset %d outside the image (%d bytes): %w",
			img.f.Name(), n, off, img.size, errIO)
	}
	return nil
}

// zeroChunk bounds the buffer of zeroes written in place.
const zeroChunk = 1 << 20

// write is qed_aio_write_data for n bytes at guest offset off: p holds
// the data, or is nil to make whole clusters read as zeroes.
func (img *Image) write(off, n int64, p []byte) error {
	for done := int64(0); done < n; {
		pos := off + done
		img.mu.Lock()
		r, err := img.findRun(pos, n-done)
		if err != nil {
			img.mu.Unlock()
			return err
		}
		var piece []byte
		if p != nil {
			piece = p[done : done+r.length]
		}
		switch {
		case r.kind == data:
			img.mu.Unlock()
			err = img.writeInPlace(r.host, r.length, piece)
		case p == nil && r.kind == zero:
			img.mu.Unlock()
		default:
			err = img.allocate(pos, r.length, piece, r.kind == zero)
			img.mu.Unlock()
		}
		if err != nil {
			return err
		}
		done += r.length
	}
	return nil
}

// writeInPlace writes p (or n zeroes when p is nil) at host offset host.
func (img *Image) writeInPlace(host, n int64, p []byte) error {
	if p != nil {
		_, err := img.f.WriteAt(p, host)
		return err
	}
	buf := make([]byte, min(n, zeroChunk))
	for done := int64(0); done < n; done += int64(len(buf)) {
		if _, err := img.f.WriteAt(buf[:min(int64(len(buf)), n-done)], host+done); err != nil {
			return err
		}
	}
	return nil
}

// allocate is qed_aio_write_alloc for n bytes at guest offset pos, all
// in unallocated or (when wasZero) zero clusters of one L2 table: p (or,
// when nil, zero clusters) goes into new clusters at the end of the
// file, whose untouched head and tail are filled from the backing image
// or, for zero clusters, with zeroes; then the L2 table and, for a new
// table, the L1 entry are updated. The caller holds mu.
func (img *Image) allocate(pos, n int64, p []byte, wasZero bool) error {
	cs := img.clusterSize
	first := pos &^ (cs - 1)
	nclusters := (pos + n - first + cs - 1) / cs
	var host int64
	if p != nil {
		host = img.fileSize
		img.fileSize += nclusters * cs
	}
	if img.backing == nil && img.hdr.Features&featNeedCheck == 0 {
		// With a backing file the flush below orders data and tables.
		img.hdr.Features |= featNeedCheck
		if err := img.writeHeader(); err != nil {
			return err
		}
	}
	if p != nil {
		head := make([]byte, pos-first)
		tail := make([]byte, first+nclusters*cs-(pos+n))
		if !wasZero {
			if err := formats.ReadBacking(img.backing, head, first); err != nil {
				return err
			}
			if err := formats.ReadBacking(img.backing, tail, pos+n); err != nil {
				return err
			}
		}
		for _, w := range []struct {
			b   []byte
			off int64
		}{{head, host}, {p, host + pos - first}, {tail, host + pos - first + n}} {
			if len(w.b) == 0 {
				continue
			}
			if _, err := img.f.WriteAt(w.b, w.off); err != nil {
				return fmt.Errorf("%s: writing new clusters at %#x: %w", img.f.Name(), w.off, err)
			}
		}
		if img.backing != nil {
			if err := img.f.Sync(); err != nil {
				return err
			}
		}
	}
	return img.updateL2(pos, nclusters, host)
}

// updateL2 points the nclusters L2 entries from guest offset pos at
// host clusters from host on (or marks them zero when host is 0),
// allocating the L2 table when the L1 entry is empty: the whole new
// table is written before the L1 entry. The caller holds mu.
func (img *Image) updateL2(pos, nclusters, host int64) error {
	l1i := pos >> (img.clusterBits + img.tableBits)
	i := (pos >> img.clusterBits) & (img.tableEntries - 1)
	l2off := img.l1[l1i]
	var t []uint64
	if l2off == 0 {
		l2off = uint64(img.fileSize)
		img.fileSize += img.hdr.tableBytes()
		t = make([]uint64, img.tableEntries)
	} else {
		var err error
		if t, err = img.l2Table(l2off); err != nil {
			return err
		}
	}
	for j := range nclusters {
		e := uint64(zeroCluster)
		if host != 0 {
			e = uint64(host + j*img.clusterSize)
		}
		t[i+j] = e
	}
	if img.l1[l1i] != 0 {
		return img.writeEntries(t, l2off, i, nclusters)
	}
	if err := img.writeEntries(t, l2off, 0, img.tableEntries); err != nil {
		return err
	}
	img.cacheL2(l2off, t)
	img.l1[l1i] = l2off
	return img.writeEntries(img.l1, img.hdr.L1TableOffset, l1i, 1)
}

func alignUp(n, a int64) int64 { return (n + a - 1) &^ (a - 1) }

// BlockStatus is bdrv_qed_co_block_status: data clusters are data at
// their host offset, zero clusters read as zeroes, unallocated ones
// belong to the backing image. Runs do not cross L2 tables.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w", img.f.Name(), length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	img.mu.Lock()
	r, err := img.findRun(off, length)
	img.mu.Unlock()
	if err != nil {
		return formats.Extent{}, err
	}
	e := formats.Extent{Length: r.length}
	switch r.kind {
	case zero:
		e.Status = formats.StatusZero
	case data:
		e.Status = formats.StatusData | formats.StatusOffsetValid
		e.Offset, e.File = r.host, img.f.Name()
	}
	return e, nil
}

// Flush makes completed writes durable and then, as QEMU's need-check
// timer does once writes pause, clears the need-check bit.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.f.Sync(); err != nil {
		return err
	}
	if img.hdr.Features&featNeedCheck == 0 {
		return nil
	}
	img.hdr.Features &^= featNeedCheck
	return img.writeHeader()
}

// Close flushes (leaving the image clean, as bdrv_qed_close does) and
// closes the backing image and the file.
func (img *Image) Close() error {
	err := img.Flush()
	if img.backing != nil {
		if berr := img.backing.Close(); err == nil {
			err = berr
		}
	}
	if cerr := img.f.Close(); err == nil {
		err = cerr
	}
	return err
}
