// Package parallels is the Parallels (ploop) disk image format as QEMU
// 7.2's block/parallels.c reads and writes it: a 64-byte header, a
// catalog (BAT) of 32-bit cluster offsets right after it, and clusters of
// "tracks" sectors allocated one after the other at the end of the data.
// Old images ("WithoutFreeSpace") store catalog offsets in sectors, new
// ones ("WithouFreSpacExt") in clusters. An image opened read-write is
// marked in use until it is closed.
package parallels

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

const (
	magicOld     = "WithoutFreeSpace"
	magicExt     = "WithouFreSpacExt"
	version      = 2
	headerSize   = 64
	sectorSize   = 512
	inUseMagic   = 0x746F6E59
	defaultClust = 1 << 20
	// maxImageFactor bounds the virtual size by the cluster size as QEMU's
	// MAX_PARALLELS_IMAGE_FACTOR does (a catalog of 32-bit entries).
	maxImageFactor = 1 << 32
)

// runtimeOptions are parallels_runtime_opts: how far past the data an
// allocation grows the file at once (the file is trimmed back to the
// data on close), and whether the growth is allocated (falloc) or left
// sparse (truncate).
var runtimeOptions = []formats.OptionSpec{
	{Name: "prealloc-size", Type: formats.OptSize, Help: "Preallocation size on image expansion", Default: "128M"},
	{Name: "prealloc-mode", Type: formats.OptString, Default: "falloc", Values: []string{"falloc", "truncate"},
		Help: "Preallocation mode on image expansion (allowed values: falloc, truncate)"},
}

func init() {
	formats.Register(&formats.Driver{
		Name:           "parallels",
		Probe:          probe,
		Open:           open,
		Create:         create,
		CreateOptions:  createOptions,
		RuntimeOptions: runtimeOptions,
	})
}

// probe is parallels_probe: either magic and version 2.
func probe(buf []byte, _ string) int {
	if len(buf) < headerSize {
		return 0
	}
	m := string(buf[:16])
	if (m == magicOld || m == magicExt) && binary.LittleEndian.Uint32(buf[16:]) == version {
		return 100
	}
	return 0
}

// header is the on-disk ParallelsHeader.
type header struct {
	Magic      [16]byte
	Version    uint32
	Heads      uint32
	Cylinders  uint32
	Tracks     uint32
	BATEntries uint32
	NbSectors  uint64
	InUse      uint32
	DataOff    uint32
	Flags      uint32
	ExtOff     uint64
}

func (h *header) encode() []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, h)
	return b.Bytes()
}

func decodeHeader(buf []byte) *header {
	h := &header{}
	binary.Read(bytes.NewReader(buf[:headerSize]), binary.LittleEndian, h)
	return h
}

// Image is an open Parallels image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	size     int64
	cluster  int64
	// mult converts catalog entries to sectors: 1 for old images, the
	// cluster size in sectors for new ones.
	mult int64
	// unclean: the header said in use when the image was opened (a
	// program did not close it); Check reports and repairs it.
	unclean bool
	// prealloc is how many bytes past a new cluster the file grows when
	// the cluster does not fit (prealloc-size, at least one cluster);
	// truncate grows it sparse instead of allocating (prealloc-mode).
	prealloc int64
	truncate bool

	// mu guards hdr, bat and dataEnd: lookups hold it shared, allocating
	// writes exclusively.
	mu      sync.RWMutex
	hdr     *header
	bat     []uint32
	dataEnd int64 // in sectors: where the next cluster goes
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
	_ formats.Checker   = (*Image)(nil)
)

// errIO is what QEMU reports for a request outside the image.
var errIO = formats.ErrnoError{Err: syscall.EIO}

// open is parallels_open.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func load(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	buf := make([]byte, headerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	h := decodeHeader(buf)
	m := string(h.Magic[:])
	if m != magicOld && m != magicExt || h.Version != version {
		return nil, formats.Errorf(formats.ErrWrongFormat, "Image not in Parallels format")
	}
	if h.Tracks == 0 {
		return nil, formats.Errorf(formats.ErrCorrupt, "Invalid image: Zero sectors per track")
	}
	if h.Tracks > math.MaxInt32/513 {
		return nil, formats.Errorf(formats.ErrCorrupt, "Invalid image: Too big cluster")
	}
	if h.BATEntries > math.MaxInt32/4 {
		return nil, formats.Errorf(formats.ErrCorrupt, "Catalog too large")
	}
	img := &Image{
		f:        f,
		readOnly: f.ReadOnly(),
		cluster:  int64(h.Tracks) * sectorSize,
		mult:     1,
		hdr:      h,
	}
	if err := img.setRuntime(o); err != nil {
		return nil, err
	}
	if m == magicExt {
		img.mult = int64(h.Tracks)
	}
	// Guest offsets are int64 bytes; the catalog must cover the whole
	// virtual size (QEMU would index past it).
	if h.NbSectors > math.MaxInt64/sectorSize || h.NbSectors > uint64(h.BATEntries)*uint64(h.Tracks) {
		return nil, fmt.Errorf("%s: virtual size of %d sectors exceeds the catalog's %d clusters of %d sectors: %w",
			f.Name(), h.NbSectors, h.BATEntries, h.Tracks, formats.ErrCorrupt)
	}
	img.size = int64(h.NbSectors) * sectorSize
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	// The catalog must lie within the file, which also bounds the
	// allocation below by the file size.
	batBytes := 4 * int64(h.BATEntries)
	if headerSize+batBytes > fileSize {
		return nil, fmt.Errorf("%s: catalog of %d entries extends past the end of the file (%d bytes): %w",
			f.Name(), h.BATEntries, fileSize, formats.ErrCorrupt)
	}
	raw := make([]byte, batBytes)
	if _, err := f.ReadAt(raw, headerSize); err != nil {
		return nil, err
	}
	img.bat = make([]uint32, h.BATEntries)
	img.dataEnd = int64(h.DataOff)
	if img.dataEnd == 0 {
		img.dataEnd = (headerSize + batBytes + sectorSize - 1) / sectorSize
	}
	for i := range img.bat {
		e := binary.LittleEndian.Uint32(raw[4*i:])
		img.bat[i] = e
		if s := int64(e) * img.mult; e != 0 && s >= img.dataEnd {
			img.dataEnd = s + int64(h.Tracks)
		}
	}
	// QEMU reads the format extension only when it opens read-only (it
	// warns and ignores it otherwise).
	if h.ExtOff != 0 && img.readOnly {
		if err := img.checkExtension(h.ExtOff, fileSize); err != nil {
			return nil, err
		}
	}
	if h.InUse == inUseMagic {
		img.unclean = true
		if !img.readOnly && !o.Check {
			return nil, formats.Errorf(formats.ErrCorrupt, "parallels: Image was not closed correctly; cannot be opened read/write")
		}
	}
	if !img.readOnly {
		h.InUse = inUseMagic
		if err := img.writeHeader(); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// setRuntime applies the runtime options as parallels_open does: the
// preallocation counts whole sectors and is at least one cluster.
func (img *Image) setRuntime(o *formats.OpenOptions) error {
	rt, err := o.RuntimeValues(runtimeOptions)
	if err != nil {
		return err
	}
	size, _ := rt.Uint("prealloc-size")
	img.prealloc = max(int64(min(size/sectorSize, math.MaxInt64/sectorSize))*sectorSize, img.cluster)
	img.truncate = rt.String("prealloc-mode") == "truncate"
	return nil
}

// writeHeader writes the header and makes it durable, as
// parallels_update_header does before data depends on it.
func (img *Image) writeHeader() error {
	if _, err := img.f.WriteAt(img.hdr.encode(), 0); err != nil {
		return err
	}
	return img.f.Sync()
}

func (img *Image) Size() int64      { return img.size }
func (img *Image) Format() string   { return "parallels" }
func (img *Image) Filename() string { return img.f.Name() }

// hostOffset is where guest offset off lives, or -1 when its cluster is
// not allocated. The caller holds mu.
func (img *Image) hostOffset(off int64) int64 {
	e := img.bat[off/img.cluster]
	if e == 0 {
		return -1
	}
	return int64(e)*img.mult*sectorSize + off%img.cluster
}

// ReadAt reads guest bytes; unallocated clusters read as zeroes.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	return formats.ReadBlocks(img.f.Name(), p, off, img.size, img.cluster, func(q []byte, pos int64) (int, error) {
		img.mu.RLock()
		host := img.hostOffset(pos)
		img.mu.RUnlock()
		if host < 0 {
			clear(q)
			return len(q), nil
		}
		return img.f.ReadAt(q, host)
	})
}

// WriteAt writes guest bytes, allocating clusters at the end of the data
// on first write. A write that does not fit in Size fails as a whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.readOnly {
		return 0, formats.ErrReadOnly
	}
	end := off + int64(len(p))
	return formats.WriteBlocks(img.f.Name(), p, off, img.size, img.cluster, func(q []byte, pos int64) error {
		img.mu.RLock()
		host := img.hostOffset(pos)
		img.mu.RUnlock()
		if host < 0 {
			return img.allocate(pos, q, end)
		}
		_, err := img.f.WriteAt(q, host)
		return err
	})
}

// allocate writes data (within one cluster) at guest offset off into a
// new cluster at the end of the data, as allocate_clusters does: when the
// cluster does not fit, the file grows by the clusters the request (up
// to end) is about to allocate, plus the preallocation, allocated with
// zeroes or (prealloc-mode=truncate) sparse; a cluster within the file
// is zeroed the same way, in case the file holds stale bytes there. Then
// the data is written, and then the catalog entry.
func (img *Image) allocate(off int64, data []byte, end int64) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if host := img.hostOffset(off); host >= 0 {
		// Another writer allocated the cluster meanwhile.
		_, err := img.f.WriteAt(data, host)
		return err
	}
	idx := off / img.cluster
	entry := img.dataEnd / img.mult
	if img.dataEnd%img.mult != 0 || entry > math.MaxUint32 {
		return fmt.Errorf("%s: data end at sector %d cannot be stored in the catalog: %w",
			img.f.Name(), img.dataEnd, formats.ErrCorrupt)
	}
	start := img.dataEnd * sectorSize
	fileSize, err := img.f.Size()
	if err != nil {
		return err
	}
	grow := start+img.cluster > fileSize
	// QEMU allocates the request's run of unallocated clusters at once,
	// so the file grows by all of them. Once it has grown, the rest of
	// the run fits and is not counted again.
	space := img.cluster
	for next := (idx + 1) * img.cluster; grow && next < end && img.hostOffset(next) < 0; next += img.cluster {
		space += img.cluster
	}
	switch {
	case img.truncate && grow:
		err = img.f.Truncate(start + space + img.prealloc)
	case img.truncate:
		if img.f.PunchHole(start, img.cluster) != nil {
			err = writeZeroes(img.f, start, img.cluster)
		}
	default:
		n := img.cluster
		if grow {
			n = space + img.prealloc
		}
		if img.f.ZeroRange(start, n) != nil {
			// Filesystems without FALLOC_FL_ZERO_RANGE: write the
			// zeroes of the cluster itself and grow the file sparse,
			// so that the rest of the run fits.
			err = writeZeroes(img.f, start, img.cluster)
			if err == nil && grow {
				err = img.f.Truncate(start + n)
			}
		}
	}
	if err != nil {
		return err
	}
	if _, err := img.f.WriteAt(data, start+off%img.cluster); err != nil {
		return err
	}
	if err := img.setEntry(idx, uint32(entry)); err != nil {
		return err
	}
	img.dataEnd += int64(img.hdr.Tracks)
	return nil
}

// writeZeroes writes n zero bytes at off in bounded chunks.
func writeZeroes(f *formats.File, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := f.WriteAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// BlockStatus is parallels_co_block_status: allocated clusters are data
// at their host offset, runs merging while the host offsets are
// contiguous; unallocated clusters are left to the backing chain (read
// as zeroes without one).
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w", img.f.Name(), length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	host, n := formats.MappedRun(off, length, img.cluster, img.hostOffset)
	if host < 0 {
		return formats.Extent{Length: n}, nil
	}
	return formats.Extent{Length: n, Status: formats.StatusData | formats.StatusOffsetValid, Offset: host, File: img.f.Name()}, nil
}

// Describe adds nothing: QEMU 7.2's parallels driver has no
// bdrv_get_info, so info shows neither cluster size nor dirty flag.
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{}, nil
}

// Flush makes completed writes durable.
func (img *Image) Flush() error { return img.f.Sync() }

// Close is parallels_close: a writable image is marked clean and the file
// trimmed to the end of the data, dropping the preallocated tail.
func (img *Image) Close() error {
	var err error
	if !img.readOnly {
		img.mu.Lock()
		img.hdr.InUse = 0
		err = img.writeHeader()
		if terr := img.f.Truncate(img.dataEnd * sectorSize); err == nil {
			err = terr
		}
		img.mu.Unlock()
	}
	if cerr := img.f.Close(); err == nil {
		err = cerr
	}
	return err
}
