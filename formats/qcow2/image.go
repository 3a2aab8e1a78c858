package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&Driver)
}

// Driver is the qcow2 format driver.
var Driver = formats.Driver{
	Name:           "qcow2",
	Probe:          probe,
	Open:           open,
	Create:         create,
	CreateOptions:  createOptions,
	CanCompress:    true,
	RuntimeOptions: runtimeOptions,
}

func probe(buf []byte, _ string) int {
	if len(buf) >= 8 && binary.BigEndian.Uint32(buf) == Magic && binary.BigEndian.Uint32(buf[4:]) >= 2 {
		return 100
	}
	return 0
}

// Cache capacities. L2 tables: enough to map 256 GiB with 64 KiB
// clusters; refcount blocks: a quarter of that. Never fewer than 16
// entries so that one request's tables stay resident.
const (
	l2CacheBytes       = 32 << 20
	refblockCacheBytes = 8 << 20
	minCacheEntries    = 16
)

// Image is an open qcow2 image. It is safe for concurrent use.
type Image struct {
	file *formats.File // the qcow2 file
	// data holds guest clusters: the external data file, or file.
	data     *formats.File
	readOnly bool
	backing  formats.Image
	warn     func(string)

	// freeMu keeps host clusters from being reused while a request still
	// uses a mapping it looked up: reads and writes hold it shared for
	// their whole duration, operations that free clusters (discard,
	// zeroing with unmap, shrinking) hold it exclusively.
	freeMu sync.RWMutex

	// mu guards all metadata below, the caches, and allocation. Data
	// I/O to already mapped clusters happens outside it.
	mu       sync.Mutex
	hdr      *Header
	lay      Layout
	size     int64
	l1       []uint64 // active L1 table, host byte order
	reftable []uint64 // refcount table, host byte order
	l2Cache  *tableCache
	l2Ahead  tableReadahead
	rbCache  *tableCache
	// l2Sorted and rbSorted are the host offsets in l1 and reftable in
	// order, for the overlap checks; nil until needed. setL1 keeps
	// l2Sorted; any other change of either table calls tablesChanged.
	l2Sorted, rbSorted []uint64

	// crypt is the LUKS encryption of an encrypted image, else nil.
	crypt *cryptoState
	// snapshots and the bitmap directory as read at open or last
	// written (for info and for the overlap checks).
	snapshots []SnapshotEntry
	bitmaps   []BitmapEntry
	// freeHint is the lowest cluster index that may be free.
	freeHint int64
	// freeBytePos is the next byte for compressed data inside a
	// partially used host cluster, 0 when none (qcow2_alloc_bytes).
	freeBytePos int64
	// l2NeedsRefcounts: dirty L2 tables reference clusters whose
	// refcount increments are still only in the cache, so refcount
	// blocks must reach the disk first. refcountsNeedL2: refcount
	// decrements are cached for clusters whose L2 entries were removed
	// in dirty tables, so L2 tables must reach the disk first.
	l2NeedsRefcounts bool
	refcountsNeedL2  bool
	// dirtyBitSet: the header's dirty bit is set on disk (lazy
	// refcounts), to be cleared once refcounts are flushed.
	dirtyBitSet bool
	// metaPrealloc caches qcow2_detect_metadata_preallocation's answer:
	// 0 not yet asked, 1 no, 2 yes.
	metaPrealloc int
	// bm: loaded persistent bitmaps and the write tracking state.
	bm     bitmapState
	closed bool
	// runtime holds the --image-opts settings imgfs acts on.
	runtime runtimeSettings
}

var (
	_ formats.Image            = (*Image)(nil)
	_ formats.Backed           = (*Image)(nil)
	_ formats.Zeroer           = (*Image)(nil)
	_ formats.Discarder        = (*Image)(nil)
	_ formats.Resizer          = (*Image)(nil)
	_ formats.Describer        = (*Image)(nil)
	_ formats.CompressedWriter = (*Image)(nil)
)

// open is Driver.Open. It owns f and closes it on failure.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := openImage(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// readHeader reads and decodes the header, its extensions and the
// backing file name from the first cluster of f.
func readHeader(f *formats.File) (*Header, error) {
	first := make([]byte, 512)
	if _, err := f.ReadAt(first, 0); err != nil {
		return nil, fmt.Errorf("Could not read qcow2 header: %w", formats.ErrnoError{Err: err})
	}
	if _, err := DecodeHeader(first); err != nil {
		// Errors from the fixed fields need no more bytes, except for a
		// header length beyond 512 which needs the whole cluster.
		if binary.BigEndian.Uint32(first) != Magic || binary.BigEndian.Uint32(first[100:]) <= 512 {
			return nil, err
		}
	}
	bits := binary.BigEndian.Uint32(first[20:])
	cluster := make([]byte, 1<<bits)
	if _, err := f.ReadAt(cluster, 0); err != nil {
		return nil, fmt.Errorf("Could not read qcow2 header: %w", formats.ErrnoError{Err: err})
	}
	return DecodeHeaderCluster(cluster)
}

// DecodeHeaderCluster decodes the header and its extensions from the
// image's first cluster, checking what QEMU checks before it looks at any
// table: version, sizes, feature bits and compression type.
func DecodeHeaderCluster(cluster []byte) (*Header, error) {
	h, err := DecodeHeader(cluster)
	if err != nil {
		return nil, err
	}
	if err := h.checkCompressionType(); err != nil {
		return nil, err
	}
	if h.IncompatibleFeatures&^incompatKnown != 0 {
		// Errors in the extensions do not matter here; only the
		// feature names are wanted for the message.
		_ = h.DecodeExtensions(cluster)
		return nil, h.CheckFeatures()
	}
	if err := h.DecodeExtensions(cluster); err != nil {
		return nil, err
	}
	return h, nil
}

func (h *Header) checkCompressionType() error {
	switch h.CompressionType {
	case CompressionZlib:
		if h.IncompatibleFeatures&IncompatCompressionType != 0 {
			return errorf(formats.ErrCorrupt, "qcow2: Compression type incompatible feature bit must not be set")
		}
	case CompressionZstd:
		if h.IncompatibleFeatures&IncompatCompressionType == 0 {
			return errorf(formats.ErrCorrupt, "qcow2: Compression type incompatible feature bit must be set")
		}
	default:
		return errorf(formats.ErrUnsupported, "qcow2: unknown compression type: %d", h.CompressionType)
	}
	return nil
}

// validateTable checks a table's offset and size as qcow2_validate_table.
func validateTable(h *Header, offset, entries, entryLen, maxBytes uint64, name string) error {
	if entries > maxBytes/entryLen {
		return errorf(formats.ErrCorrupt, "%s too large", name)
	}
	if offset >= maxHostOffset || offset&(h.ClusterSize()-1) != 0 {
		return errorf(formats.ErrCorrupt, "%s offset invalid", name)
	}
	return nil
}

func openImage(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	h, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	readOnly := o.ReadOnly || f.ReadOnly()
	if h.IncompatibleFeatures&IncompatCorrupt != 0 && !readOnly && !o.Check {
		return nil, errorf(formats.ErrCorrupt, "qcow2: Image is corrupt; cannot be opened read/write")
	}
	if h.RefcountOrder > 6 {
		return nil, errorf(formats.ErrUnsupported, "Reference count entry width too large; may not exceed 64 bits")
	}
	rs, err := parseRuntime(o, h)
	if err != nil {
		return nil, err
	}
	lay := NewLayout(h)
	if lay.SubclusterSize < 1<<minClusterBits {
		return nil, errorf(formats.ErrUnsupported, "Unsupported subcluster size: %d", lay.SubclusterSize)
	}
	var crypt *cryptoState
	if h.CryptMethod != cryptNone {
		var err error
		if crypt, err = openCrypto(f, h, o); err != nil {
			return nil, err
		}
	}
	if h.RefcountTableClusters == 0 {
		return nil, errorf(formats.ErrCorrupt, "Image does not contain a reference count table")
	}
	if err := validateTable(h, h.RefcountTableOffset, uint64(h.RefcountTableClusters), h.ClusterSize(), maxRefcountTableBytes, "Reference count table"); err != nil {
		return nil, err
	}
	if err := validateTable(h, h.SnapshotsOffset, uint64(h.NbSnapshots), snapshotHeaderLen, snapshotHeaderLen*maxSnapshots, "Snapshot table"); err != nil {
		return nil, err
	}
	if err := validateTable(h, h.L1TableOffset, uint64(h.L1Size), 8, maxL1Bytes, "Active L1 table"); err != nil {
		return nil, err
	}
	if h.Size > 1<<62 {
		return nil, errorf(formats.ErrUnsupported, "Image is too big")
	}
	if int64(h.L1Size) < lay.L1SizeFor(int64(h.Size)) {
		return nil, errorf(formats.ErrCorrupt, "L1 table is too small")
	}
	img := &Image{
		runtime:  rs,
		file:     f,
		data:     f,
		readOnly: readOnly,
		warn:     o.Warn,
		hdr:      h,
		lay:      lay,
		size:     int64(h.Size),
		crypt:    crypt,
	}
	for _, w := range h.Warnings {
		img.warnf("%s", w)
	}
	if img.l1, err = readTable(f, h.L1TableOffset, int64(h.L1Size)); err != nil {
		return nil, fmt.Errorf("Could not read L1 table: %w", err)
	}
	if img.reftable, err = readTable(f, h.RefcountTableOffset, int64(h.RefcountTableClusters)<<(h.ClusterBits-3)); err != nil {
		return nil, fmt.Errorf("Could not initialize refcount handling: %w", err)
	}
	img.newCaches()
	if err := img.openDataFile(f, o); err != nil {
		return nil, err
	}
	if img.snapshots, err = ReadSnapshotTable(f, h); err != nil {
		img.closeFiles()
		return nil, err
	}
	if img.bitmaps, err = ReadBitmapDirectory(f, h); err != nil {
		img.closeFiles()
		return nil, err
	}
	if h.BackingFile != "" && !o.NoBacking {
		if img.backing, err = formats.OpenBacking(f.Name(), h.BackingFile, h.BackingFormat, o); err != nil {
			img.closeFiles()
			return nil, err
		}
	}
	if !img.readOnly {
		if err := img.openReadWrite(!o.Check); err != nil {
			img.closeFiles()
			return nil, err
		}
	}
	return img, nil
}

// openDataFile opens the external data file: the one the data-file
// runtime option names, else the one named in the header. Like QEMU,
// qemu-img info (NoIO) opens none, so an image can be looked at without
// touching the files it names.
func (img *Image) openDataFile(f *formats.File, o *formats.OpenOptions) error {
	h := img.hdr
	if o.NoIO {
		return nil
	}
	if name := img.runtime.dataFile; name != "" {
		d, err := formats.OpenFile(name, img.readOnly, o.Direct)
		if err != nil {
			return err
		}
		if h.IncompatibleFeatures&IncompatDataFile == 0 {
			d.Close()
			return errorf(formats.ErrInvalidOption, "'data-file' can only be set for images with an external data file")
		}
		img.data = d
		return nil
	}
	if h.IncompatibleFeatures&IncompatDataFile == 0 {
		if h.AutoclearFeatures&AutoclearDataFileRaw != 0 {
			return errorf(formats.ErrCorrupt, "data-file-raw requires a data file")
		}
		return nil
	}
	if h.DataFile == "" {
		return errorf(formats.ErrInvalidOption, "'data-file' is required for this image")
	}
	// QEMU 7.2 opens the name as it stands (relative to the working
	// directory); fall back to the image's directory, where the mount
	// and most users keep the data file.
	d, err := o.OpenFile(h.DataFile, img.readOnly)
	if err != nil && errors.Is(err, os.ErrNotExist) {
		if alt := formats.BackingPath(f.Name(), h.DataFile); alt != h.DataFile {
			if d2, err2 := o.OpenFile(alt, img.readOnly); err2 == nil {
				d, err = d2, nil
			}
		}
	}
	if err != nil {
		return err
	}
	img.data = d
	return nil
}

// openReadWrite does what QEMU does when an image is opened for writing:
// clear unknown autoclear bits and, with repair (not for check), repair
// an image left dirty.
func (img *Image) openReadWrite(repair bool) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	if h.AutoclearFeatures&^autoclearKnown != 0 {
		h.AutoclearFeatures &= autoclearKnown
		if err := img.writeHeader(); err != nil {
			return fmt.Errorf("Could not update qcow2 header: %w", err)
		}
	}
	if repair && h.IncompatibleFeatures&IncompatDirty != 0 {
		if err := img.repairDirty(); err != nil {
			return fmt.Errorf("Could not repair dirty image: %w", err)
		}
	}
	return nil
}

// newCaches makes empty metadata caches, no larger than the image can
// use (as QEMU sizes its L2 cache to cover the image).
func (img *Image) newCaches() {
	cs := img.lay.ClusterSize
	l2 := min(int(l2CacheBytes/cs), len(img.l1))
	rb := min(int(refblockCacheBytes/cs), len(img.reftable))
	img.l2Cache = newTableCache(max(minCacheEntries, l2), img.writeL2)
	img.rbCache = newTableCache(max(minCacheEntries, rb), img.writeRefblock)
}

func (img *Image) warnf(format string, args ...any) {
	if img.warn != nil {
		img.warn(fmt.Sprintf(format, args...))
	}
}

// readTable reads n big-endian 64-bit entries at off. n was bounded by
// validateTable.
func readTable(f *formats.File, off uint64, n int64) ([]uint64, error) {
	buf := make([]byte, n*8)
	if _, err := f.ReadAt(buf, int64(off)); err != nil {
		return nil, formats.ErrnoError{Err: err}
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[8*i:])
	}
	return t, nil
}

// Size is the virtual size.
func (img *Image) Size() int64 {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.size
}

// Format is "qcow2".
func (img *Image) Format() string { return "qcow2" }

// Filename is the image file's name.
func (img *Image) Filename() string { return img.file.Name() }

// Backing returns the open backing image, or nil.
func (img *Image) Backing() formats.Image { return img.backing }

// BackingInfo returns the backing file name and format from the header.
func (img *Image) BackingInfo() (name, format string) {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.hdr.BackingFile, img.hdr.BackingFormat
}

// Flush writes all cached metadata in crash-safe order, clears the
// dirty bit of lazy refcounts, and syncs the files.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.flushLocked()
}

func (img *Image) flushLocked() error {
	if err := img.storeBitmaps(); err != nil {
		return err
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	if img.dirtyBitSet {
		if err := img.setDirtyBit(false); err != nil {
			return err
		}
	}
	if img.data != img.file {
		if err := img.data.Sync(); err != nil {
			return err
		}
	}
	return img.file.Sync()
}

// Close flushes and closes the image, its data file and backing image.
func (img *Image) Close() error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.closed {
		return nil
	}
	img.closed = true
	var err error
	if !img.readOnly {
		err = img.flushLocked()
	}
	if cerr := img.closeFiles(); err == nil {
		err = cerr
	}
	return err
}

func (img *Image) closeFiles() error {
	var errs []error
	if img.backing != nil {
		errs = append(errs, img.backing.Close())
	}
	if img.data != img.file {
		errs = append(errs, img.data.Close())
	}
	errs = append(errs, img.file.Close())
	return errors.Join(errs...)
}

// Describe reports the qcow2 part of `qemu-img info`.
func (img *Image) Describe() (*formats.Description, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	d := &formats.Description{
		ClusterSize:  img.lay.ClusterSize,
		HasDirtyFlag: true,
		DirtyFlag:    h.IncompatibleFeatures&IncompatDirty != 0,
		Encrypted:    img.crypt != nil,
	}
	for i := range img.snapshots {
		d.Snapshots = append(d.Snapshots, img.snapshots[i].info())
	}
	compression := "zlib"
	if h.CompressionType == CompressionZstd {
		compression = "zstd"
	}
	var data formats.Object
	if h.Version == 2 {
		data = formats.Object{
			{Key: "compat", Value: "0.10"},
			{Key: "refcount-bits", Value: int64(img.lay.RefcountBits)},
			{Key: "compression-type", Value: compression},
		}
	} else {
		data = formats.Object{{Key: "compat", Value: "1.1"}}
		if h.DataFile != "" {
			data = append(data, formats.Member{Key: "data-file", Value: h.DataFile})
		}
		if img.lay.HasDataFile {
			data = append(data, formats.Member{Key: "data-file-raw", Value: h.AutoclearFeatures&AutoclearDataFileRaw != 0})
		}
		data = append(data,
			formats.Member{Key: "extended-l2", Value: img.lay.ExtendedL2},
			formats.Member{Key: "lazy-refcounts", Value: h.CompatibleFeatures&CompatLazyRefcounts != 0},
			formats.Member{Key: "corrupt", Value: h.IncompatibleFeatures&IncompatCorrupt != 0},
			formats.Member{Key: "refcount-bits", Value: int64(img.lay.RefcountBits)},
		)
		if len(img.bitmaps) > 0 {
			list := make([]any, len(img.bitmaps))
			for i := range img.bitmaps {
				list[i] = img.bitmaps[i].info()
			}
			data = append(data, formats.Member{Key: "bitmaps", Value: list})
		}
		data = append(data, formats.Member{Key: "compression-type", Value: compression})
	}
	// Version 2 images report their encryption too (legacy AES).
	if img.crypt != nil {
		data = append(data, img.crypt.describe())
	}
	d.FormatSpecific = &formats.Specific{Type: "qcow2", Data: data}
	return d, nil
}

// writeHeader rewrites the header cluster's used part from img.hdr.
// QEMU writes it in one request; so does this.
func (img *Image) writeHeader() error {
	buf, err := img.hdr.Encode()
	if err != nil {
		return err
	}
	if _, err := img.file.WriteAt(buf, 0); err != nil {
		return err
	}
	return img.file.Sync()
}
