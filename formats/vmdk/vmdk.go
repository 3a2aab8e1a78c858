// Package vmdk is VMware's virtual disk format as QEMU 7.2's
// block/vmdk.c reads, writes and creates it: monolithicSparse and
// streamOptimized images (a "KDMV" sparse extent with an embedded
// descriptor), text descriptors naming FLAT, VMFS, SPARSE, VMFSSPARSE
// ("COWD") and SESPARSE extents (monolithicFlat, twoGbMaxExtentSparse,
// twoGbMaxExtentFlat, vmfs, vmfsSparse, seSparse), and backing files
// named by parentFileNameHint.
//
// The on-disk format is VMware's "Virtual Disk Format 5.0" specification;
// where QEMU reads it differently (which extent lines count, how the CID
// is found and rewritten) this package follows QEMU, so that imgfs and
// qemu-img agree on every image.
package vmdk

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"

	"github.com/imgfs/imgfs/formats"
	"golang.org/x/sys/unix"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "vmdk",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
		// QEMU's vmdk has bdrv_co_pwritev_compressed: convert -c is
		// accepted (and writes plainly to uncompressed extents).
		CanCompress: true,
	})
}

// Image is an open VMDK image. It is safe for concurrent use.
type Image struct {
	file     *formats.File // the image file: descriptor or sparse extent
	readOnly bool
	extents  []*extent
	size     int64
	// createType is the descriptor's createType ("" for a bare COWD file).
	createType     string
	cid, parentCID uint32
	backing        formats.Image
	backingName    string
	backingFmt     string
	descOffset     int64 // where the descriptor text starts in file

	// mu guards the grain tables (cache and on-disk updates), grain
	// allocation (extent.nextSector), cid, cidUpdated and cidChecked.
	// Reads and writes of allocated grains run outside it.
	mu         sync.Mutex
	cidUpdated bool // the CID was changed by the first write of this open
	cidChecked bool // the backing image's CID matched parentCID once
}

// Compile-time checks of the capabilities Image claims.
var (
	_ formats.Image            = (*Image)(nil)
	_ formats.Backed           = (*Image)(nil)
	_ formats.Zeroer           = (*Image)(nil)
	_ formats.Describer        = (*Image)(nil)
	_ formats.Checker          = (*Image)(nil)
	_ formats.CompressedWriter = (*Image)(nil)
	_ formats.AllocatedSizer   = (*Image)(nil)
	_ formats.CompressedOnly   = (*Image)(nil)
)

// opener carries the state of one open: the options, the image's own
// file and how deep descriptors nest.
type opener struct {
	img   *Image
	o     *formats.OpenOptions
	depth int
	// files counts the extent files opened, against descriptors that
	// name (themselves) too many times.
	files int
}

func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img := &Image{file: f, readOnly: f.ReadOnly()}
	op := &opener{img: img, o: o}
	if err := op.openImage(); err != nil {
		img.Close()
		return nil, err
	}
	return img, nil
}

func (op *opener) openImage() error {
	img := op.img
	buf, err := readDesc(img.file, 0)
	if err != nil {
		return err
	}
	switch string(buf[:4]) {
	case magicCOWD, magicKDMV:
		if err := op.openSparse(img.file, buf); err != nil {
			return err
		}
		img.descOffset = 0x200
	default:
		if err := op.openDescriptor(cString(buf)); err != nil {
			return err
		}
	}
	for _, e := range img.extents {
		if e.sectors > (math.MaxInt64-img.size)/sectorSize {
			return formats.Errorf(formats.ErrCorrupt, "%s: extents add up to more than 2^63 bytes", img.file.Name())
		}
		e.start = img.size
		img.size += e.sectors * sectorSize
	}
	desc := make([]byte, descSize)
	if _, err := img.file.ReadAt(desc, img.descOffset); err != nil {
		return err
	}
	desc[descSize-1] = 0
	text := cString(desc)
	hint, ok := parentHint(text)
	if !ok {
		return errInvalidArgument(img.file.Name())
	}
	var okCID, okParent bool
	img.cid, okCID = readCID(text, false)
	img.parentCID, okParent = readCID(text, true)
	if !okCID || !okParent {
		return errInvalidArgument(img.file.Name())
	}
	if hint != "" {
		img.backingName, img.backingFmt = hint, "vmdk"
		if !op.o.NoBacking {
			b, err := formats.OpenBacking(img.file.Name(), hint, "vmdk", op.o)
			if err != nil {
				return err
			}
			img.backing = b
		}
	}
	return nil
}

// errInvalidArgument is how QEMU reports an open that failed without a
// message of its own (a descriptor without a CID, say).
func errInvalidArgument(name string) error {
	return formats.Errorf(formats.ErrCorrupt, "Could not open '%s': Invalid argument", name)
}

// readDesc is vmdk_read_desc: the start of a file (at most 1 MiB), which
// is either a sparse header or descriptor text.
func readDesc(f *formats.File, off int64) ([]byte, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("Could not access file: %w", formats.ErrnoError{Err: err})
	}
	if size < 4 {
		return nil, formats.Errorf(formats.ErrWrongFormat, "File is too small, not a valid image")
	}
	buf := make([]byte, min(size, maxDescRead))
	if _, err := f.ReadAt(buf, off); err != nil {
		return nil, fmt.Errorf("Could not read from file: %w", err)
	}
	return buf, nil
}

// openDescriptor is vmdk_open_desc_file: check the createType, then
// open every extent the descriptor names, relative to the directory of
// the image file (also for a descriptor inside a sparse extent, as in
// QEMU).
func (op *opener) openDescriptor(desc string) error {
	img := op.img
	ct, ok := parseQuoted(desc, "createType", 128)
	if !ok {
		return formats.Errorf(formats.ErrCorrupt, "invalid VMDK image descriptor")
	}
	if !supportedCreateTypes[ct] {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported image type '%s'", ct)
	}
	img.createType = ct
	lines, err := parseExtents(desc)
	if err != nil {
		return formats.Errorf(formats.ErrCorrupt, "%s", err.Error())
	}
	for _, l := range lines {
		path := l.filename
		if !filepath.IsAbs(path) {
			name := img.file.Name()
			path = name[:strings.LastIndexByte(name, '/')+1] + path
		}
		flat := l.typ == "FLAT" || l.typ == "VMFS"
		if op.files++; op.files > maxExtentFiles {
			return formats.Errorf(formats.ErrUnsupported, "%s: more than %d extents", img.file.Name(), maxExtentFiles)
		}
		f, err := op.openExtentFile(path, flat)
		if err != nil {
			return err
		}
		n := len(img.extents)
		switch l.typ {
		case "FLAT", "VMFS":
			if l.offset > math.MaxInt64/sectorSize {
				f.Close()
				return formats.Errorf(formats.ErrCorrupt, "%s: extent offset %d out of range", img.file.Name(), l.offset)
			}
			e := &extent{f: f, own: true, kind: kindFlat, sectors: l.sectors,
				flatOffset: l.offset * sectorSize, grainSectors: l.sectors}
			img.extents = append(img.extents, e)
		case "SPARSE", "VMFSSPARSE":
			buf, err := readDesc(f, 0)
			if err == nil {
				err = op.openSparse(f, buf)
			}
			if err != nil {
				f.Close()
				return err
			}
		case "SESPARSE":
			if err := op.openSESparse(f); err != nil {
				f.Close()
				return err
			}
		}
		if len(img.extents) > n {
			img.extents[len(img.extents)-1].typ = l.typ
			img.extents[len(img.extents)-1].own = true
		}
	}
	return nil
}

// openExtentFile opens and locks one extent file as QEMU opens an extent
// child: flat extents carry data only, sparse ones metadata too.
func (op *opener) openExtentFile(path string, flat bool) (*formats.File, error) {
	f, err := op.o.OpenFile(path, op.img.readOnly)
	if err != nil {
		return nil, err
	}
	access := formats.Access{NoIO: op.o.NoIO, Write: !op.img.readOnly, Metadata: !flat, ForceShare: op.o.ForceShare}
	if _, err := formats.LockFile(f, access.Perms()); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// openSparse opens a COWD or KDMV extent whose first bytes are buf.
func (op *opener) openSparse(f *formats.File, buf []byte) error {
	switch string(buf[:4]) {
	case magicCOWD:
		return op.openCOWD(f)
	case magicKDMV:
		return op.openKDMV(f)
	}
	return formats.Errorf(formats.ErrWrongFormat, "Image not in VMDK format")
}

func (op *opener) openCOWD(f *formats.File) error {
	b := make([]byte, header3Size)
	if _, err := f.ReadAt(b, 4); err != nil {
		return fmt.Errorf("Could not read header from file '%s': %w", f.Name(), err)
	}
	h := decodeHeader3(b)
	if h.Granularity == 0 {
		return formats.Errorf(formats.ErrCorrupt, "Invalid granularity, image may be corrupt")
	}
	e := &extent{f: f, kind: kindSparse, sectors: int64(h.DiskSectors), entrySize: 4,
		l1Offset: int64(h.L1DirOffset) << 9, l1Size: h.L1DirSize, gtEntries: 4096,
		grainSectors: int64(h.Granularity)}
	return op.addExtent(e)
}

func (op *opener) openKDMV(f *formats.File) error {
	img := op.img
	b := make([]byte, header4Size)
	if _, err := f.ReadAt(b, 4); err != nil {
		return formats.Errorf(formats.ErrCorrupt, "Could not read header from file '%s': %v", f.Name(), err)
	}
	h := decodeHeader4(b)
	if h.Capacity == 0 && h.DescOffset != 0 {
		// A sparse file holding only a descriptor for other extents.
		if op.depth >= maxNesting {
			return formats.Errorf(formats.ErrCorrupt, "%s: descriptors nested deeper than %d levels", f.Name(), maxNesting)
		}
		buf, err := readDesc(f, int64(h.DescOffset)<<9)
		if err != nil {
			return err
		}
		op.depth++
		defer func() { op.depth-- }()
		return op.openDescriptor(cString(buf))
	}
	if img.createType == "" {
		img.createType = "monolithicSparse"
	}
	if h.GDOffset == gdAtEnd {
		// The footer takes precedence over the header. Like QEMU, its
		// place is computed from the image file's size.
		size, err := img.file.Size()
		if err != nil {
			return err
		}
		fb := make([]byte, 3*sectorSize)
		size = (size + sectorSize - 1) &^ (sectorSize - 1)
		if size < int64(len(fb)) {
			return formats.Errorf(formats.ErrCorrupt, "Invalid footer")
		}
		if _, err := f.ReadAt(fb, size-int64(len(fb))); err != nil {
			return fmt.Errorf("Failed to read footer: %w", err)
		}
		fm, eos := decodeMarker(fb), decodeMarker(fb[2*sectorSize:])
		if string(fb[sectorSize:sectorSize+4]) != magicKDMV || fm.Size != 0 || fm.Type != markerFooter ||
			eos.Val != 0 || eos.Size != 0 || eos.Type != markerEOS {
			return formats.Errorf(formats.ErrCorrupt, "Invalid footer")
		}
		h = decodeHeader4(fb[sectorSize+4:])
	}
	compressed := h.CompressAlgo == compressionDeflate
	if h.Version > maxVersion {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported VMDK version %d", h.Version)
	}
	if h.Version == 3 && !img.readOnly && !compressed {
		// Version 3 adds changed block tracking, which a writer would
		// have to maintain.
		return formats.Errorf(formats.ErrUnsupported, "VMDK version 3 must be read only")
	}
	if h.NumGTEsPerGT > maxGTEsPerGT {
		return formats.Errorf(formats.ErrCorrupt, "L2 table size too big")
	}
	// QEMU computes these in 32 bits; so do we, to agree on odd headers.
	l1EntrySectors := h.NumGTEsPerGT * uint32(h.Granularity)
	if l1EntrySectors == 0 {
		return formats.Errorf(formats.ErrCorrupt, "L1 entry size is invalid")
	}
	l1Size := uint32((h.Capacity + uint64(l1EntrySectors) - 1) / uint64(l1EntrySectors))
	var backupOff int64
	if h.Flags&flagRGD != 0 {
		backupOff = int64(h.RGDOffset << 9)
	}
	fsize, err := f.Size()
	if err != nil {
		return err
	}
	if uint64(fsize/sectorSize) < h.GrainOffset {
		return formats.Errorf(formats.ErrCorrupt, "File truncated, expecting at least %d bytes", int64(h.GrainOffset*sectorSize))
	}
	e := &extent{f: f, kind: kindSparse, sectors: int64(h.Capacity), entrySize: 4,
		l1Offset: int64(h.GDOffset << 9), l1BackupOffset: backupOff, l1Size: l1Size,
		gtEntries: h.NumGTEsPerGT, grainSectors: int64(h.Granularity),
		compressed: compressed, marker: h.Flags&flagMarker != 0, zeroGrain: h.Flags&flagZeroGrain != 0,
		version: h.Version, gdAtEnd: h.GDOffset == gdAtEnd}
	if e.compressed {
		img.createType = "streamOptimized"
	}
	return op.addExtent(e)
}

func (op *opener) openSESparse(f *formats.File) error {
	if !op.img.readOnly {
		return formats.Errorf(formats.ErrUnsupported, "No write support for seSparse images available")
	}
	b := make([]byte, sectorSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		return fmt.Errorf("Could not read const header from file '%s': %w", f.Name(), err)
	}
	h := decodeSEConstHeader(b)
	switch {
	case h.Magic != seConstMagic:
		return formats.Errorf(formats.ErrCorrupt, "Bad const header magic: 0x%016x", h.Magic)
	case h.Version != seVersion:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported version: 0x%016x", h.Version)
	case h.GrainSize != 8:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported grain size: %d", h.GrainSize)
	case h.GrainTableSize != 64:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported grain table size: %d", h.GrainTableSize)
	case h.Flags != 0:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported flags: 0x%016x", h.Flags)
	case h.Reserved != [4]uint64{}:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported reserved bits: 0x%016x 0x%016x 0x%016x 0x%016x",
			h.Reserved[0], h.Reserved[1], h.Reserved[2], h.Reserved[3])
	case !h.PadIsZero:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported non-zero const header padding")
	}
	if h.VolatileHeaderOffset > 1<<54 {
		return formats.Errorf(formats.ErrCorrupt, "%s: volatile header offset %#x out of range", f.Name(), h.VolatileHeaderOffset)
	}
	if _, err := f.ReadAt(b, int64(h.VolatileHeaderOffset)*sectorSize); err != nil {
		return fmt.Errorf("Could not read volatile header from file '%s': %w", f.Name(), err)
	}
	v := decodeSEVolatileHeader(b)
	switch {
	case v.Magic != seVolatileMagic:
		return formats.Errorf(formats.ErrCorrupt, "Bad volatile header magic: 0x%016x", v.Magic)
	case v.ReplayJournal != 0:
		return formats.Errorf(formats.ErrUnsupported, "Image is dirty, Replaying journal not supported")
	case !v.PadIsZero:
		return formats.Errorf(formats.ErrUnsupported, "Unsupported non-zero volatile header padding")
	}
	if h.GrainDirOffset > 1<<54 || h.GrainDirSize > 1<<54 || h.Capacity > 1<<54 {
		return formats.Errorf(formats.ErrCorrupt, "%s: seSparse grain directory out of range", f.Name())
	}
	l1 := h.GrainDirSize * sectorSize / 8
	if l1 > maxL1Entries {
		return formats.Errorf(formats.ErrCorrupt, "L1 size too big")
	}
	e := &extent{f: f, kind: kindSESparse, sectors: int64(h.Capacity), entrySize: 8,
		l1Offset: int64(h.GrainDirOffset) * sectorSize, l1Size: uint32(l1), gtEntries: 4096,
		grainSectors: int64(h.GrainSize), seTablesOffset: h.GrainTablesOffset, seGrainsOffset: h.GrainsOffset}
	return op.addExtent(e)
}

// addExtent is vmdk_add_extent plus vmdk_init_tables: the sanity
// limits, the allocation point, and the grain directories.
func (op *opener) addExtent(e *extent) error {
	if e.grainSectors > maxGrainSectors {
		return formats.Errorf(formats.ErrCorrupt, "Invalid granularity, image may be corrupt")
	}
	if e.l1Size > maxL1Entries {
		return formats.Errorf(formats.ErrCorrupt, "L1 size too big")
	}
	if e.sectors < 0 || e.sectors > 1<<54 {
		return formats.Errorf(formats.ErrCorrupt, "%s: extent of %d sectors is too large", e.f.Name(), e.sectors)
	}
	size, err := e.f.Size()
	if err != nil {
		return err
	}
	fileSectors := (size + sectorSize - 1) / sectorSize
	e.nextSector = (fileSectors + e.grainSectors - 1) / e.grainSectors * e.grainSectors
	e.l1EntrySectors = int64(uint32(e.gtEntries) * uint32(e.grainSectors))
	e.cache = newTableCache(int(e.gtEntries) * e.entrySize)
	var err2 error
	if e.l1, err2 = readTable(e.f, e.l1Offset, int64(e.l1Size), e.entrySize, size); err2 != nil {
		return fmt.Errorf("Could not read l1 table from extent '%s': %w", e.f.Name(), err2)
	}
	if e.l1BackupOffset != 0 {
		if e.l1Backup, err2 = readTable(e.f, e.l1BackupOffset, int64(e.l1Size), 4, size); err2 != nil {
			return fmt.Errorf("Could not read l1 backup table from extent '%s': %w", e.f.Name(), err2)
		}
	}
	op.img.extents = append(op.img.extents, e)
	return nil
}

// Size is the virtual size: the sum of the extents' sizes.
func (img *Image) Size() int64 { return img.size }

func (img *Image) Format() string   { return "vmdk" }
func (img *Image) Filename() string { return img.file.Name() }

// Backing returns the parent image, or nil.
func (img *Image) Backing() formats.Image { return img.backing }

// BackingInfo returns parentFileNameHint; its format is always vmdk.
func (img *Image) BackingInfo() (string, string) { return img.backingName, img.backingFmt }

// Flush makes completed writes durable in every file of the image.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	for _, e := range img.extents {
		if e.f != img.file {
			if err := e.f.Sync(); err != nil {
				return err
			}
		}
	}
	return img.file.Sync()
}

// Close closes the extent files, the image file and the backing image.
func (img *Image) Close() error {
	var errs []error
	for _, e := range img.extents {
		if e.own && e.f != img.file {
			errs = append(errs, e.f.Close())
		}
	}
	errs = append(errs, img.file.Close())
	if img.backing != nil {
		errs = append(errs, img.backing.Close())
	}
	return errors.Join(errs...)
}

// updateCID gives the image a new random CID on its first write after
// open (vmdk_write_cid), so that children made against the old content
// no longer match. The caller holds mu.
func (img *Image) updateCID() error {
	if img.cidUpdated {
		return nil
	}
	buf := make([]byte, descSize)
	if _, err := img.file.ReadAt(buf, img.descOffset); err != nil {
		return err
	}
	cid := rand.Uint32()
	if !replaceCID(buf, cid) {
		return fmt.Errorf("%s: no parentCID in the descriptor: %w", img.file.Name(), formats.ErrnoError{Err: unix.EINVAL})
	}
	// QEMU's write is clipped to the file's sector-rounded length: a
	// text descriptor grows to whole sectors, not to DESC_SIZE.
	size, err := img.file.Size()
	if err != nil {
		return err
	}
	n := min(int64(descSize), (size+sectorSize-1)&^(sectorSize-1)-img.descOffset)
	if n > 0 {
		if _, err := img.file.WriteAt(buf[:n], img.descOffset); err != nil {
			return err
		}
	}
	img.cid, img.cidUpdated = cid, true
	return nil
}

// backingValid is vmdk_is_cid_valid: data may come from the parent only
// while its CID is the parentCID this image was made against. The
// caller holds mu.
func (img *Image) backingValid() bool {
	if img.cidChecked || img.backing == nil {
		return true
	}
	p, ok := img.backing.(*Image)
	if !ok {
		return false
	}
	buf := make([]byte, descSize)
	if _, err := p.file.ReadAt(buf, p.descOffset); err != nil {
		return false
	}
	buf[descSize-1] = 0
	cid, ok := readCID(cString(buf), false)
	if !ok || cid != img.parentCID {
		return false
	}
	img.cidChecked = true
	return true
}

// errIO and errInval are the errnos QEMU's vmdk requests fail with.
var (
	errIO    = formats.ErrnoError{Err: unix.EIO}
	errInval = formats.ErrnoError{Err: unix.EINVAL}
)
