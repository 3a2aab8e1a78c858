// convert-to/: every image directory offers its image converted to a
// handful of formats as plain files, so that `cp disk.qcow2/convert-to/
// disk.vmdk /elsewhere/` is a conversion.
//
// How a target is made. A target file must have an exact st_size before
// its first read and must not need a temporary copy of the whole image.
// Running the converter into a scratch file would copy every data
// cluster once, so instead each target is a generated layout: the few
// metadata structures of the format, built in memory from the source's
// allocation map (formats.ChainStatus over the image, which reads no
// data), and data clusters mapped onto the source's guest bytes, read
// from the source when the target is read. Memory is bounded by the
// metadata (one table entry per allocated cluster), not the data.
//
// The fixed parts of each format (qcow2's header cluster with its
// extensions, a VHD footer and dynamic header, a VDI header, a VMDK
// sparse header with its descriptor and tables, the VHDX headers, log,
// metadata and empty BAT) come from the real
// driver: the layout creates an empty image of the right size with the
// driver's Create in a temporary directory, which writes metadata only
// (a fixed VHD is a sparse truncate), and reads them from it. What the
// drivers do not export, the way each format maps a cluster to a table
// entry, is written here following the formats' specifications
// (docs/interop/qcow2.txt, the VHD, VDI, VMDK sparse extent and VHDX
// specs), with data clusters in guest order. The results are valid
// images qemu-img checks clean and finds identical to the source, not
// byte copies of what qemu-img convert would write.
//
// Compressed targets (disk.compressed.qcow2, disk.stream.vmdk) are laid
// out the same way, but their size depends on every compressed length:
// the first stat or open after a change compresses every data cluster
// once, in parallel on all cores, with the driver's own compressor, and
// keeps only the lengths (memory bounded by the cluster count). Reads
// compress the clusters they touch again; the compressor is
// deterministic, so the bytes are the same, and a length that comes out
// different fails the read with EIO rather than changing the file.
//
// A target is built on the first stat or open and kept while the source
// file, every file of its backing chain and what the mount changed in
// them stay the same, so every read returns the same bytes; after a
// change by any path (disk, ctl, a commit into a backing image, a write
// on the host) the next stat or open builds it again and the kernel's
// cached pages are dropped. SEEK_DATA/SEEK_HOLE and st_blocks follow
// the source's block status, so cp skips the holes of a sparse target.

package fs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
)

// preset is one file of convert-to/.
type preset struct {
	name string
	// build lays the target out for a source of the given (sector
	// rounded) size; scratch is an empty directory for the template.
	build func(img formats.Image, size int64, scratch string) (*layout, error)
}

var presets = []preset{
	{name: "disk.raw", build: buildRaw},
	{name: "disk.qcow2", build: buildQcow2},
	{name: "disk.compressed.qcow2", build: buildQcow2Compressed},
	{name: "disk.vmdk", build: buildVMDK},
	{name: "disk.stream.vmdk", build: buildVMDKStream},
	{name: "disk.vhd", build: buildVHDDynamic},
	{name: "disk.fixed.vhd", build: buildVHDFixed},
	{name: "disk.vdi", build: buildVDI},
	{name: "disk.vhdx", build: buildVHDX},
}

// sectorSize is the unit convert rounds the source size up to.
const sectorSize = 512

// maxMetadata bounds the metadata a template may make us read: a
// driver's empty image larger than this is not the format we expect.
const maxMetadata = 64 << 20

// layout is a generated image file: parts in file order, each either
// bytes made in memory or a run of the source's guest bytes; whatever
// no part covers reads as zeroes.
type layout struct {
	size  int64
	parts []part
	// blocks is st_blocks: the data bytes in 512-byte units.
	blocks uint64
}

type part struct {
	off, n int64
	// mem holds the part's bytes; gen makes them (from img, at rel
	// bytes into the part); when both are nil the part is the source's
	// guest bytes from src (zeroes past the source's end).
	mem []byte
	gen func(img formats.Image, p []byte, rel int64) error
	src int64
}

func (l *layout) addMem(off int64, b []byte) {
	l.parts = append(l.parts, part{off: off, n: int64(len(b)), mem: b})
}

// addSrc maps n file bytes at off onto guest bytes at src, merging with
// the previous part when both are contiguous.
func (l *layout) addSrc(off, n, src int64) {
	if k := len(l.parts); k > 0 {
		p := &l.parts[k-1]
		if p.mem == nil && p.gen == nil && p.off+p.n == off && p.src+p.n == src {
			p.n += n
			return
		}
	}
	l.parts = append(l.parts, part{off: off, n: n, src: src})
}

// finish sorts the parts and checks that they neither overlap nor pass
// the end, so that reads can binary search them.
func (l *layout) finish() (*layout, error) {
	sort.Slice(l.parts, func(i, j int) bool { return l.parts[i].off < l.parts[j].off })
	end := int64(0)
	for _, p := range l.parts {
		if p.off < end || p.off+p.n > l.size {
			return nil, fmt.Errorf("convert-to layout: part at %d+%d overlaps or passes %d", p.off, p.n, l.size)
		}
		end = p.off + p.n
	}
	return l, nil
}

// readAt fills p with the file's bytes at off, reading mapped parts from
// img. It returns how many bytes it filled (short only at the end).
func (l *layout) readAt(img formats.Image, p []byte, off int64) (int, error) {
	if off >= l.size {
		return 0, nil
	}
	p = p[:min(int64(len(p)), l.size-off)]
	clear(p)
	i := sort.Search(len(l.parts), func(i int) bool { return l.parts[i].off+l.parts[i].n > off })
	for ; i < len(l.parts) && l.parts[i].off < off+int64(len(p)); i++ {
		pt := l.parts[i]
		lo, hi := max(pt.off, off), min(pt.off+pt.n, off+int64(len(p)))
		dst := p[lo-off : hi-off]
		if pt.mem != nil {
			copy(dst, pt.mem[lo-pt.off:])
			continue
		}
		if pt.gen != nil {
			if err := pt.gen(img, dst, lo-pt.off); err != nil {
				return 0, err
			}
			continue
		}
		g := pt.src + lo - pt.off
		if g >= img.Size() {
			continue
		}
		dst = dst[:min(int64(len(dst)), img.Size()-g)]
		if _, err := img.ReadAt(dst, g); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
	}
	return len(p), nil
}

// dataAt reports whether the file byte at off holds data and how many
// bytes from there (at most until the part or gap ends) share that:
// made bytes are data, mapped ones are data where the source's chain
// has some, and gaps between parts are holes.
func (l *layout) dataAt(img formats.Image, off int64) (bool, int64, error) {
	i := sort.Search(len(l.parts), func(i int) bool { return l.parts[i].off+l.parts[i].n > off })
	if i == len(l.parts) {
		return false, l.size - off, nil
	}
	pt := l.parts[i]
	switch {
	case off < pt.off:
		return false, pt.off - off, nil
	case pt.mem != nil, pt.gen != nil:
		return true, pt.off + pt.n - off, nil
	}
	g := pt.src + off - pt.off
	rest := pt.off + pt.n - off
	if g >= img.Size() {
		return false, rest, nil
	}
	e, err := formats.ChainStatus(img, g, min(rest, img.Size()-g))
	if err != nil {
		return false, 0, err
	}
	if e.Length <= 0 {
		return false, 0, fmt.Errorf("convert-to: block status at %d returned no progress", g)
	}
	return e.Status&formats.StatusData != 0 && e.Status&formats.StatusZero == 0, e.Length, nil
}

// seek finds the first data (or hole) byte at or after off, as
// lseek(SEEK_DATA/SEEK_HOLE) does: the end of the file counts as a hole;
// off at or past the end, or no data after off, is ENXIO.
func (l *layout) seek(img formats.Image, off int64, data bool) (int64, error) {
	if off >= l.size {
		return 0, syscall.ENXIO
	}
	for pos := off; pos < l.size; {
		d, n, err := l.dataAt(img, pos)
		if err != nil {
			return 0, err
		}
		if d == data {
			return pos, nil
		}
		pos += n
	}
	if data {
		return 0, syscall.ENXIO
	}
	return l.size, nil
}

// allocated counts the bytes seek finds to be data, for st_blocks, so
// that cp sees a sparse file and skips its holes.
func (l *layout) allocated(img formats.Image) (int64, error) {
	total := int64(0)
	for pos := int64(0); pos < l.size; {
		d, n, err := l.dataAt(img, pos)
		if err != nil {
			return 0, err
		}
		if d {
			total += n
		}
		pos += n
	}
	return total, nil
}

// run is a range [start, end) of units (clusters, blocks, grains).
type run struct{ start, end int64 }

// dataUnits lists the units of the given size that hold any data in the
// source's chain, in order, merged into runs. Ranges that read as
// zeroes stay unallocated in the target.
func dataUnits(img formats.Image, unit int64) ([]run, error) {
	var runs []run
	size := img.Size()
	for off := int64(0); off < size; {
		e, err := formats.ChainStatus(img, off, size-off)
		if err != nil {
			return nil, err
		}
		if e.Length <= 0 {
			return nil, fmt.Errorf("convert-to: block status at %d returned no progress", off)
		}
		if e.Status&formats.StatusData != 0 && e.Status&formats.StatusZero == 0 {
			s, t := off/unit, (off+e.Length+unit-1)/unit
			if k := len(runs); k > 0 && runs[k-1].end >= s {
				runs[k-1].end = max(runs[k-1].end, t)
			} else {
				runs = append(runs, run{s, t})
			}
		}
		off += e.Length
	}
	return runs, nil
}

// template creates an empty image of the format with the driver's own
// Create and returns its open file.
func template(scratch, format, opts string, size int64) (*os.File, error) {
	d := formats.Lookup(format)
	if d == nil || d.Create == nil {
		return nil, fmt.Errorf("convert-to: no %s driver that creates images", format)
	}
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		return nil, err
	}
	if err := o.Set("size", strconv.FormatInt(size, 10)); err != nil {
		return nil, err
	}
	name := filepath.Join(scratch, "template."+format)
	if err := d.Create(name, o); err != nil {
		return nil, err
	}
	return os.Open(name)
}

// readTemplate reads n bytes at off of a template, refusing sizes no
// empty image of the expected layout has.
func readTemplate(f *os.File, off, n int64) ([]byte, error) {
	if n < 0 || n > maxMetadata {
		return nil, fmt.Errorf("convert-to: template metadata of %d bytes at %d", n, off)
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		return nil, fmt.Errorf("convert-to: reading template: %w", err)
	}
	return b, nil
}

func buildRaw(_ formats.Image, size int64, _ string) (*layout, error) {
	l := &layout{size: size}
	l.addSrc(0, size, 0)
	return l.finish()
}

// buildQcow2 lays out a qcow2 v3 image with the driver's cluster size
// and 16-bit refcounts: the driver's header cluster, the refcount
// table, the refcount blocks, the L1 table, the L2 tables, then the data
// clusters in guest order, each with refcount 1 (so L1 and L2 entries
// carry the COPIED flag).
func buildQcow2(img formats.Image, size int64, scratch string) (*layout, error) {
	return qcow2Build(img, size, scratch, false)
}

// buildQcow2Compressed is buildQcow2 with every data cluster compressed
// by the driver's own compressor, as `convert -c` writes them; clusters
// that do not shrink are stored whole, ahead of the compressed ones,
// which follow each other byte by byte. The file size depends on every
// compressed length, so building compresses every data cluster once
// (on all cores) and keeps only the lengths; reads compress the
// clusters they touch again, which gives the same bytes because the
// compressor is deterministic (and a length that came out different is
// an I/O error, not a silent change).
func buildQcow2Compressed(img formats.Image, size int64, scratch string) (*layout, error) {
	return qcow2Build(img, size, scratch, true)
}

func qcow2Build(img formats.Image, size int64, scratch string, compress bool) (*layout, error) {
	f, err := template(scratch, "qcow2", "", size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hdr, err := readTemplate(f, 0, 512)
	if err != nil {
		return nil, err
	}
	be := binary.BigEndian
	bits := be.Uint32(hdr[20:])
	if string(hdr[:4]) != "QFI\xfb" || be.Uint32(hdr[4:]) != 3 || bits < 9 || bits > 21 || be.Uint32(hdr[96:]) != 4 {
		return nil, errors.New("convert-to: unexpected qcow2 template header")
	}
	cs := int64(1) << bits
	if hdr, err = readTemplate(f, 0, cs); err != nil {
		return nil, err
	}
	runs, err := dataUnits(img, cs)
	if err != nil {
		return nil, err
	}
	var z *compressedClusters
	if compress {
		if z, err = compressAll(img, f.Name(), qcow2Packing, cs, size, runs); err != nil {
			return nil, err
		}
	}
	l2Entries := cs / 8
	l1Size := (size + cs*l2Entries - 1) / (cs * l2Entries)
	l1Clusters := (l1Size*8 + cs - 1) / cs
	// The L2 tables, by L1 index, and the clusters stored whole.
	var l2Index []int64
	whole := int64(0)
	for _, r := range runs {
		whole += r.end - r.start
		for i := r.start / l2Entries; i <= (r.end-1)/l2Entries; i++ {
			if len(l2Index) == 0 || l2Index[len(l2Index)-1] != i {
				l2Index = append(l2Index, i)
			}
		}
	}
	packed := int64(0) // bytes of compressed clusters
	if z != nil {
		whole -= int64(len(z.guest))
		packed = z.off[len(z.off)-1]
	}
	// The refcount structures count themselves: grow them until they
	// cover every cluster.
	perBlock := cs * 8 / 16
	rtClusters, rbClusters := int64(1), int64(1)
	var total int64
	for {
		total = 1 + rtClusters + rbClusters + l1Clusters + int64(len(l2Index)) + whole + (packed+cs-1)/cs
		rb := (total + perBlock - 1) / perBlock
		rt := (rb*8 + cs - 1) / cs
		if rb == rbClusters && rt == rtClusters {
			break
		}
		rbClusters, rtClusters = max(rb, rbClusters), max(rt, rtClusters)
	}
	rtOff := cs
	rbOff := rtOff + rtClusters*cs
	l1Off := rbOff + rbClusters*cs
	l2Off := l1Off + l1Clusters*cs
	wholeOff := l2Off + int64(len(l2Index))*cs
	packedOff := wholeOff + whole*cs

	be.PutUint32(hdr[36:], uint32(l1Size))
	be.PutUint64(hdr[40:], uint64(l1Off))
	be.PutUint64(hdr[48:], uint64(rtOff))
	be.PutUint32(hdr[56:], uint32(rtClusters))

	l := &layout{size: total * cs}
	l.addMem(0, hdr)
	rt := make([]byte, rtClusters*cs)
	for i := int64(0); i < rbClusters; i++ {
		be.PutUint64(rt[i*8:], uint64(rbOff+i*cs))
	}
	l.addMem(rtOff, rt)
	rb := make([]byte, rbClusters*cs)
	for i := int64(0); i < packedOff/cs; i++ {
		be.PutUint16(rb[i*2:], 1)
	}
	l.addMem(rbOff, rb)
	const copied = uint64(1) << 63
	l1 := make([]byte, l1Clusters*cs)
	tables := make(map[int64][]byte, len(l2Index))
	for k, i := range l2Index {
		be.PutUint64(l1[i*8:], uint64(l2Off+int64(k)*cs)|copied)
		tables[i] = make([]byte, cs)
		l.addMem(l2Off+int64(k)*cs, tables[i])
	}
	l.addMem(l1Off, l1)
	// Compressed cluster descriptors: the host offset in the low x bits,
	// the sectors it spans past the first above them (docs/interop/qcow2.txt).
	x := 62 - (bits - 8)
	k := 0 // next compressed cluster
	host := wholeOff
	for _, r := range runs {
		for c := r.start; c < r.end; c++ {
			entry := tables[c/l2Entries][(c%l2Entries)*8:]
			if z != nil && k < len(z.guest) && z.guest[k] == c {
				off, n := packedOff+z.off[k], z.off[k+1]-z.off[k]
				sectors := (off+n-1)>>9 - off>>9
				be.PutUint64(entry, 1<<62|uint64(sectors)<<x|uint64(off))
				for h := off / cs; h <= (off+n-1)/cs; h++ {
					be.PutUint16(rb[h*2:], be.Uint16(rb[h*2:])+1)
				}
				k++
				continue
			}
			be.PutUint64(entry, uint64(host)|copied)
			l.addSrc(host, cs, c*cs)
			host += cs
		}
	}
	if packed > 0 {
		l.parts = append(l.parts, part{off: packedOff, n: packed, gen: z.read})
	}
	return l.finish()
}

// packing is how a format stores compressed units one after another.
type packing struct {
	format string // the driver whose compressor is used
	// marker is the room ahead of each unit's compressed data that the
	// driver's Compress leaves for a VMDK grain marker (the unit's guest
	// sector, the data length), filled in here.
	marker int64
	// align pads each record: VMDK grains start on sector boundaries.
	align int64
	// pad compresses whole units, zeroes past the image's end included
	// (qcow2); otherwise the last unit is cut at the end (VMDK, as QEMU).
	pad bool
}

var (
	qcow2Packing = packing{format: "qcow2", align: 1, pad: true}
	vmdkPacking  = packing{format: "vmdk", marker: 12, align: 512}
)

// record is the length of a unit stored with n compressed bytes.
func (pk packing) record(n int) int64 {
	return (int64(n) + pk.align - 1) / pk.align * pk.align
}

// compressedClusters are the data units of a target that are stored
// compressed: their guest unit numbers in order and where each one's
// record starts in the packed run (with the run's end last).
type compressedClusters struct {
	pk    packing
	cw    formats.CompressedWriter
	unit  int64
	size  int64 // the target's virtual size
	guest []int64
	off   []int64

	// mu guards the last record made for a read: sequential reads cut
	// records in two, and the second half need not compress again.
	mu       sync.Mutex
	lastK    int
	lastData []byte
}

// compressAll compresses every data unit once, on all cores, to learn
// the compressed lengths. The compressor is the driver's, from the
// template image opened read-only; it stays open (it does no I/O to
// compress) until the layout is dropped.
func compressAll(img formats.Image, tmplName string, pk packing, unit, size int64, runs []run) (*compressedClusters, error) {
	tmpl, err := formats.Open(tmplName, formats.OpenOptions{ReadOnly: true, Format: pk.format})
	if err != nil {
		return nil, err
	}
	cw, ok := tmpl.(formats.CompressedWriter)
	if !ok || cw.CompressionUnit() != unit {
		tmpl.Close()
		return nil, fmt.Errorf("convert-to: the %s driver does not compress units of %d bytes", pk.format, unit)
	}
	z := &compressedClusters{pk: pk, cw: cw, unit: unit, size: size, off: []int64{0}, lastK: -1}
	var all []int64
	for _, r := range runs {
		for c := r.start; c < r.end; c++ {
			all = append(all, c)
		}
	}
	lens := make([]int, len(all))
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, runtime.NumCPU())
	for w := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := make([]byte, unit)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(all)) {
					return
				}
				out, err := z.compress(img, all[i], src)
				if err != nil {
					errs[w] = err
					return
				}
				lens[i] = len(out) // 0: it did not shrink
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		tmpl.Close()
		return nil, err
	}
	for i, c := range all {
		if lens[i] > 0 {
			z.guest = append(z.guest, c)
			z.off = append(z.off, z.off[len(z.off)-1]+pk.record(lens[i]))
		}
	}
	runtime.AddCleanup(z, func(img formats.Image) { img.Close() }, tmpl)
	return z, nil
}

// compress reads guest unit u into src and compresses it; nil means it
// does not shrink.
func (z *compressedClusters) compress(img formats.Image, u int64, src []byte) ([]byte, error) {
	off := u * z.unit
	n := min(z.unit, z.size-off)
	clear(src)
	if in := min(n, img.Size()-off); in > 0 {
		if _, err := img.ReadAt(src[:in], off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
	}
	if z.pk.pad {
		n = z.unit
	}
	out, ok := z.cw.Compress(nil, src[:n])
	if !ok {
		return nil, nil
	}
	return out, nil
}

// read is the packed run's generator: it fills p with the packed bytes
// from rel, compressing the units they belong to again.
func (z *compressedClusters) read(img formats.Image, p []byte, rel int64) error {
	k := sort.Search(len(z.guest), func(i int) bool { return z.off[i+1] > rel })
	src := make([]byte, z.unit)
	for ; k < len(z.guest) && z.off[k] < rel+int64(len(p)); k++ {
		z.mu.Lock()
		rec := z.lastData
		if z.lastK != k {
			rec = nil
		}
		z.mu.Unlock()
		if rec == nil {
			out, err := z.compress(img, z.guest[k], src)
			if err != nil {
				return err
			}
			if z.pk.record(len(out)) != z.off[k+1]-z.off[k] || out == nil {
				return fmt.Errorf("convert-to: unit %d compressed to %d bytes, not as before: %w", z.guest[k], len(out), syscall.EIO)
			}
			rec = make([]byte, z.off[k+1]-z.off[k])
			copy(rec, out)
			if z.pk.marker != 0 {
				binary.LittleEndian.PutUint64(rec, uint64(z.guest[k]*z.unit/512))
				binary.LittleEndian.PutUint32(rec[8:], uint32(int64(len(out))-z.pk.marker))
			}
			z.mu.Lock()
			z.lastK, z.lastData = k, rec
			z.mu.Unlock()
		}
		lo, hi := max(z.off[k], rel), min(z.off[k+1], rel+int64(len(p)))
		copy(p[lo-rel:hi-rel], rec[lo-z.off[k]:])
	}
	return nil
}

// buildVHDFixed is the source's bytes followed by the footer the vpc
// driver writes for a fixed disk; the driver rounds the size up to a
// whole CHS geometry, as qemu-img convert does, and the rest is zeroes.
func buildVHDFixed(_ formats.Image, size int64, scratch string) (*layout, error) {
	f, err := template(scratch, "vpc", "subformat=fixed", size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	end := st.Size() - 512
	if end < size {
		return nil, fmt.Errorf("convert-to: fixed vhd template of %d bytes for %d", st.Size(), size)
	}
	footer, err := readTemplate(f, end, 512)
	if err != nil {
		return nil, err
	}
	l := &layout{size: st.Size()}
	l.addSrc(0, size, 0)
	l.addMem(end, footer)
	return l.finish()
}

// buildVHDDynamic takes the footer copy, dynamic header and empty BAT
// the driver writes, then appends each block holding data as QEMU's
// vpc driver allocates it: a sector bitmap of all ones, then the block;
// the footer goes last.
func buildVHDDynamic(img formats.Image, size int64, scratch string) (*layout, error) {
	f, err := template(scratch, "vpc", "subformat=dynamic", size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	meta, err := readTemplate(f, 0, st.Size())
	if err != nil {
		return nil, err
	}
	be := binary.BigEndian
	if len(meta) < 1536+512 || string(meta[512:520]) != "cxsparse" {
		return nil, errors.New("convert-to: unexpected vhd template")
	}
	batOff := int64(be.Uint64(meta[512+16:]))
	entries := int64(be.Uint32(meta[512+28:]))
	block := int64(be.Uint32(meta[512+32:]))
	footerOff := int64(len(meta)) - 512
	if block <= 0 || block%512 != 0 || batOff+entries*4 > footerOff {
		return nil, errors.New("convert-to: unexpected vhd template")
	}
	bitmap := (block/512/8 + 511) &^ 511
	runs, err := dataUnits(img, block)
	if err != nil {
		return nil, err
	}
	head := meta[:footerOff]
	footer := meta[footerOff:]
	ones := make([]byte, bitmap)
	for i := range ones {
		ones[i] = 0xff
	}
	l := &layout{}
	pos := footerOff
	for _, r := range runs {
		for b := r.start; b < r.end && b < entries; b++ {
			be.PutUint32(head[batOff+b*4:], uint32(pos/512))
			l.addMem(pos, ones)
			l.addSrc(pos+bitmap, block, b*block)
			pos += bitmap + block
		}
	}
	l.addMem(0, head)
	l.addMem(pos, footer)
	l.size = pos + 512
	return l.finish()
}

// buildVDI takes the header and block map of a dynamic VDI from the
// driver and gives each block holding data the next slot in the data
// area, in guest order.
func buildVDI(img formats.Image, size int64, scratch string) (*layout, error) {
	f, err := template(scratch, "vdi", "", size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hdr, err := readTemplate(f, 0, 512)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	bmapOff := int64(le.Uint32(hdr[0x154:]))
	dataOff := int64(le.Uint32(hdr[0x158:]))
	block := int64(le.Uint32(hdr[0x178:]))
	blocks := int64(le.Uint32(hdr[0x180:]))
	if le.Uint32(hdr[0x40:]) != 0xbeda107f || block <= 0 || bmapOff < 512 || bmapOff+blocks*4 > dataOff {
		return nil, errors.New("convert-to: unexpected vdi template")
	}
	meta, err := readTemplate(f, 0, dataOff)
	if err != nil {
		return nil, err
	}
	runs, err := dataUnits(img, block)
	if err != nil {
		return nil, err
	}
	l := &layout{}
	n := int64(0)
	for _, r := range runs {
		for b := r.start; b < r.end && b < blocks; b++ {
			le.PutUint32(meta[bmapOff+b*4:], uint32(n))
			l.addSrc(dataOff+n*block, block, b*block)
			n++
		}
	}
	le.PutUint32(meta[0x184:], uint32(n))
	l.addMem(0, meta)
	l.size = dataOff + n*block
	return l.finish()
}

// buildVMDK takes a monolithicSparse image from the driver, whose
// header, descriptor, grain directories and (preallocated, empty) grain
// tables fill its overhead, and appends the grains holding data in
// guest order, entering each in both the grain table and its redundant
// copy.
func buildVMDK(img formats.Image, size int64, scratch string) (*layout, error) {
	return vmdkBuild(img, size, scratch, false)
}

// buildVMDKStream is buildVMDK for a streamOptimized image, which has
// the same tables (QEMU preallocates them in the overhead, and writes no
// footer): each grain is a marker (its guest sector and data length)
// and the driver's deflated grain, padded to a sector. As for
// compressed qcow2, building compresses every data grain once to learn
// the lengths, and reads compress the grains they touch again.
func buildVMDKStream(img formats.Image, size int64, scratch string) (*layout, error) {
	return vmdkBuild(img, size, scratch, true)
}

func vmdkBuild(img formats.Image, size int64, scratch string, stream bool) (*layout, error) {
	sub := "monolithicSparse"
	if stream {
		sub = "streamOptimized"
	}
	f, err := template(scratch, "vmdk", "subformat="+sub, size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hdr, err := readTemplate(f, 0, 512)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	grain := int64(le.Uint64(hdr[20:])) * 512
	perGT := int64(le.Uint32(hdr[44:]))
	rgd := int64(le.Uint64(hdr[48:])) * 512
	gd := int64(le.Uint64(hdr[56:])) * 512
	overhead := int64(le.Uint64(hdr[64:])) * 512
	if string(hdr[:4]) != "KDMV" || grain <= 0 || grain > maxMetadata || perGT <= 0 || overhead > maxMetadata {
		return nil, errors.New("convert-to: unexpected vmdk template")
	}
	meta, err := readTemplate(f, 0, overhead)
	if err != nil {
		return nil, err
	}
	runs, err := dataUnits(img, grain)
	if err != nil {
		return nil, err
	}
	var z *compressedClusters
	if stream {
		if z, err = compressAll(img, f.Name(), vmdkPacking, grain, size, runs); err != nil {
			return nil, err
		}
	}
	// gte returns where in meta the grain table entry of grain g is,
	// through the directory at dir.
	gte := func(dir, g int64) (int64, error) {
		i := g / perGT
		if dir+i*4+4 > overhead {
			return 0, errors.New("convert-to: vmdk template directory too small")
		}
		t := int64(le.Uint32(meta[dir+i*4:])) * 512
		at := t + (g%perGT)*4
		if t == 0 || at+4 > overhead {
			return 0, errors.New("convert-to: vmdk template without grain tables")
		}
		return at, nil
	}
	l := &layout{}
	pos := overhead
	k := 0 // next compressed grain
	for _, r := range runs {
		for g := r.start; g < r.end; g++ {
			host := pos
			if z != nil {
				if k >= len(z.guest) || z.guest[k] != g {
					return nil, fmt.Errorf("convert-to: grain %d did not compress", g)
				}
				host = overhead + z.off[k]
				k++
			} else {
				l.addSrc(pos, grain, g*grain)
				pos += grain
			}
			for _, dir := range []int64{gd, rgd} {
				at, err := gte(dir, g)
				if err != nil {
					return nil, err
				}
				le.PutUint32(meta[at:], uint32(host/512))
			}
		}
	}
	if z != nil && z.off[len(z.off)-1] > 0 {
		pos = overhead + z.off[len(z.off)-1]
		l.parts = append(l.parts, part{off: overhead, n: pos - overhead, gen: z.read})
	}
	l.addMem(0, meta)
	l.size = pos
	return l.finish()
}

// vhdxBATGUID is the BAT region's GUID as it is stored (mixed endian).
var vhdxBATGUID = []byte{0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}

// buildVHDX takes the headers, empty log, metadata and BAT of a new
// image from the driver and appends the payload blocks holding data,
// 1 MiB aligned as the spec wants, each marked fully present in the BAT.
// Payload BAT entries are interleaved with one sector bitmap entry per
// chunk (2^23 logical sectors); the driver's default logical sector
// size, 512, is what the chunk ratio assumes.
func buildVHDX(img formats.Image, size int64, scratch string) (*layout, error) {
	f, err := template(scratch, "vhdx", "", size)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// The block size is the driver's choice for this size; it reports it.
	tmpl, err := formats.Open(f.Name(), formats.OpenOptions{ReadOnly: true, Format: "vhdx"})
	if err != nil {
		return nil, err
	}
	desc, err := tmpl.(formats.Describer).Describe()
	tmpl.Close()
	if err != nil {
		return nil, err
	}
	block := desc.ClusterSize
	const mib = 1 << 20
	if block < mib || block%mib != 0 || (1<<23)*512%block != 0 {
		return nil, fmt.Errorf("convert-to: unexpected vhdx block size %d", block)
	}
	chunk := (1 << 23) * 512 / block
	regions, err := readTemplate(f, 192<<10, 64<<10)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if string(regions[:4]) != "regi" {
		return nil, errors.New("convert-to: unexpected vhdx region table")
	}
	var batOff, batLen int64
	for i := int64(0); i < min(int64(le.Uint32(regions[8:])), 2047); i++ {
		e := regions[16+i*32:]
		if bytes.Equal(e[:16], vhdxBATGUID) {
			batOff, batLen = int64(le.Uint64(e[16:])), int64(le.Uint32(e[24:]))
		}
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	end := (st.Size() + mib - 1) / mib * mib
	blocks := (size + block - 1) / block
	entries := blocks + (blocks-1)/chunk
	if batOff == 0 || entries*8 > batLen || batOff+batLen > st.Size() {
		return nil, errors.New("convert-to: unexpected vhdx BAT region")
	}
	// The whole template: the metadata region may lie past the BAT.
	meta, err := readTemplate(f, 0, st.Size())
	if err != nil {
		return nil, err
	}
	runs, err := dataUnits(img, block)
	if err != nil {
		return nil, err
	}
	const fullyPresent = 6
	l := &layout{}
	pos := end
	for _, r := range runs {
		for b := r.start; b < r.end && b < blocks; b++ {
			le.PutUint64(meta[batOff+(b+b/chunk)*8:], uint64(pos)|fullyPresent)
			l.addSrc(pos, block, b*block)
			pos += block
		}
	}
	l.addMem(0, meta)
	l.size = pos
	return l.finish()
}

// convertDir is the convert-to directory of an image.
type convertDir struct {
	gofs.Inode
	dir *imageDir
}

var (
	_ gofs.NodeOnAdder   = (*convertDir)(nil)
	_ gofs.NodeGetattrer = (*convertDir)(nil)
)

func (c *convertDir) OnAdd(ctx context.Context) {
	for i := range presets {
		ch := c.NewPersistentInode(ctx, &convertNode{dir: c.dir, preset: &presets[i]}, gofs.StableAttr{Mode: syscall.S_IFREG})
		c.AddChild(presets[i].name, ch, false)
	}
}

func (c *convertDir) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	key, err := statFile(c.dir.path)
	if err != nil {
		key = c.dir.key
	}
	out.Mode = syscall.S_IFDIR | 0o555
	setHostAttr(&out.Attr, key)
	return 0
}

// convertNode is one target file. Its layout is kept per version of the
// source, like a report's text.
type convertNode struct {
	gofs.Inode
	dir    *imageDir
	preset *preset

	mu    sync.Mutex // guards the cache and serialises building
	valid bool
	// chain is the version of the source's files the layout was built
	// from, gen the mount's count of changes to it.
	chain  chainEntry
	gen    uint64
	layout *layout
	// version counts rebuilt layouts; served is the one the last open
	// got, so reopening an unchanged target keeps the kernel's pages.
	version, served uint64
}

var (
	_ gofs.NodeGetattrer = (*convertNode)(nil)
	_ gofs.NodeOpener    = (*convertNode)(nil)
)

// sourceOptions open the source for building and reading a target: read
// only and without locks, as map.json does, so a target can be read
// while the disk file is open for writing in the mount.
var sourceOptions = formats.OpenOptions{ReadOnly: true, ForceShare: true}

// current returns the layout for the source as it is now.
func (n *convertNode) current() (*layout, uint64, error) {
	// The whole chain: a backing file changed on the host, or by
	// another image's commit, changes what the target holds.
	ce := n.dir.t.src.chain(n.dir.path)
	gen := n.dir.gen.Load()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.valid && ce.err == nil && n.chain.sameVersion(ce) && n.gen == gen {
		return n.layout, n.version, nil
	}
	var l *layout
	err := n.dir.use(sourceOptions, func(img formats.Image) error {
		scratch, err := os.MkdirTemp("", "imgfs-convert-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(scratch)
		size := (img.Size() + sectorSize - 1) / sectorSize * sectorSize
		if l, err = n.preset.build(img, size, scratch); err != nil {
			return err
		}
		data, err := l.allocated(img)
		l.blocks = uint64(data+511) / 512
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	hadOld := n.valid
	n.valid, n.chain, n.gen, n.layout = true, ce, gen, l
	n.version++
	if hadOld {
		notifyContent(&n.Inode, 0, 0)
	}
	return l, n.version, nil
}

func (n *convertNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	l, _, err := n.current()
	if err != nil {
		n.dir.t.logf("imgfs: %s/convert-to/%s: %v", n.dir.path, n.preset.name, err)
		return Errno(err)
	}
	key, err := statFile(n.dir.path)
	if err != nil {
		key = n.dir.key
	}
	out.Mode = syscall.S_IFREG | 0o444
	out.Size = uint64(l.size)
	// With Blksize set, go-fuse leaves Blocks alone instead of deriving
	// it from the size.
	out.Blocks, out.Blksize = l.blocks, 4096
	setHostAttr(&out.Attr, key)
	return 0
}

// convertHandle is one open target: the layout it was opened with and a
// private read-only open of the source.
type convertHandle struct {
	layout *layout
	img    formats.Image
}

var (
	_ gofs.FileReader   = (*convertHandle)(nil)
	_ gofs.FileReleaser = (*convertHandle)(nil)
	_ gofs.FileLseeker  = (*convertHandle)(nil)
)

func (n *convertNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EACCES
	}
	l, version, err := n.current()
	if err != nil {
		return nil, 0, Errno(err)
	}
	if ce := n.dir.t.src.chain(n.dir.path); ce.err != nil {
		return nil, 0, Errno(ce.err)
	}
	img, err := n.dir.t.src.open(n.dir.path, sourceOptions)
	if err != nil {
		return nil, 0, Errno(err)
	}
	n.mu.Lock()
	var fuseFlags uint32
	if version == n.served {
		fuseFlags = fuse.FOPEN_KEEP_CACHE
	}
	n.served = version
	n.mu.Unlock()
	return &convertHandle{layout: l, img: img}, fuseFlags, 0
}

func (h *convertHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	k, err := h.layout.readAt(h.img, dest, off)
	if err != nil {
		return nil, Errno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (h *convertHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	pos, err := h.layout.seek(h.img, int64(off), whence == unix.SEEK_DATA)
	if err != nil {
		return 0, Errno(err)
	}
	return uint64(pos), 0
}

func (h *convertHandle) Release(ctx context.Context) syscall.Errno {
	return Errno(h.img.Close())
}
