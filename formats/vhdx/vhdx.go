// Package vhdx is the VHDX image format of Hyper-V (MS-VHDX 1.0), as QEMU
// 7.2's block/vhdx.c and vhdx-log.c handle it: dynamic and fixed images
// with 512-byte logical sectors are created, read and written; every BAT
// change goes through the metadata log, so that a crash leaves an image
// that QEMU (and Hyper-V) replays to a consistent state; an image with a
// log left to replay is replayed on a read-write open and refused
// read-only, with QEMU's message.
//
// Differencing images (has_parent), which QEMU refuses, are read and
// written too, with their parent as the backing image. Images with 4096-byte logical sectors (made by Hyper-V) are read and
// written, which QEMU 7.2 refuses ("Operation not supported").
package vhdx

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "vhdx",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
	})
}

// probe recognises the file identifier's signature.
func probe(buf []byte, _ string) int {
	if bytes.HasPrefix(buf, fileSignature) {
		return 100
	}
	return 0
}

// Image is an open VHDX image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	warn     func(string)

	// Fixed at open.
	size          int64 // virtual disk size in bytes
	blockSize     int64
	logicalSector int64
	chunkRatio    int64 // payload blocks per sector bitmap block
	batOffset     int64
	batEntries    int64
	// regions are the file ranges the log and the region table claim,
	// against which payload blocks are checked (vhdx_region_check).
	regions []span
	// logReplayed: a log was replayed when the image was opened, which
	// check reports as a repaired corruption.
	logReplayed bool
	// sessionGUID is the file write GUID of this open's header updates.
	sessionGUID guid
	// hasParent: a differencing image; parentPath is its parent as the
	// locator names it, parent the open parent (nil when not opened).
	hasParent  bool
	parentPath string
	parent     formats.Image

	// allocMu serialises block allocation (file growth, data write,
	// log write and BAT update) so that two writers never allocate the
	// same block twice. Writes to allocated blocks do not take it.
	allocMu sync.Mutex

	// mu guards the fields below. No I/O of guest data happens under it.
	mu sync.Mutex
	// bat is the BAT as on disk, covering whole 4 KiB sectors.
	bat []uint64
	// headers are the two headers, cur the index of the current one.
	headers [2]header
	cur     int
	// visibleWritten: the data write GUID was renewed for this session.
	visibleWritten bool
	log            logState
}

// span is a half-open range of file bytes.
type span struct{ start, end uint64 }

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Zeroer    = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
	_ formats.Checker   = (*Image)(nil)
	_ formats.Backed    = (*Image)(nil)
)

// openError is a failure to open an image as QEMU reports one that has
// only an errno: "Could not open 'NAME': Invalid argument". reason says
// which check failed, for tests and debugging; QEMU prints no more.
type openError struct {
	name   string
	errno  unix.Errno
	kind   error
	reason string
}

func (e *openError) Error() string {
	return fmt.Sprintf("Could not open '%s': %s", e.name, formats.ErrnoError{Err: e.errno})
}

func (e *openError) Unwrap() []error { return []error{e.kind, e.errno} }

// invalid is an open failure QEMU reports as EINVAL.
func invalid(name, format string, args ...any) error {
	return &openError{name: name, errno: unix.EINVAL, kind: formats.ErrCorrupt, reason: fmt.Sprintf(format, args...)}
}

// unsupported is an open failure QEMU reports as ENOTSUP.
func unsupported(name, format string, args ...any) error {
	return &openError{name: name, errno: unix.ENOTSUP, kind: formats.ErrUnsupported, reason: fmt.Sprintf(format, args...)}
}

// open is Driver.Open. It owns f and closes it on failure.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := openImage(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func openImage(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	img := &Image{f: f, readOnly: o.ReadOnly || f.ReadOnly(), warn: o.Warn}
	name := f.Name()
	sig := make([]byte, 8)
	if _, err := f.ReadAt(sig, 0); err != nil {
		return nil, err
	}
	if !bytes.Equal(sig, fileSignature) {
		return nil, invalid(name, "no vhdxfile signature")
	}
	img.sessionGUID = newGUID()
	if err := img.readHeaders(); err != nil {
		return nil, err
	}
	h := img.headers[img.cur]
	img.regions = append(img.regions, span{h.LogOffset, h.LogOffset + uint64(h.LogLength)})
	if err := img.openLog(); err != nil {
		return nil, err
	}
	bat, meta, err := img.readRegionTable()
	if err != nil {
		return nil, err
	}
	if err := img.readMetadata(meta); err != nil {
		return nil, err
	}
	if err := img.readBAT(bat); err != nil {
		return nil, err
	}
	if !o.Check {
		if _, err := img.checkBAT(img.warnf, false); err != nil {
			return nil, err
		}
	}
	if img.hasParent && !o.NoBacking {
		if img.parent, err = formats.OpenBacking(name, img.parentPath, "vhdx", o); err != nil {
			return nil, err
		}
	}
	return img, nil
}

func (img *Image) warnf(msg string) {
	if img.warn != nil {
		img.warn(msg)
	}
}

// newGUID returns a random (version 4) GUID, as QEMU's
// vhdx_guid_generate takes a random UUID's bytes.
func newGUID() guid {
	var g guid
	rand.Read(g[:])
	g[6] = g[6]&0x0f | 0x40
	g[8] = g[8]&0x3f | 0x80
	return g
}

// readHeaders picks the current header as vhdx_parse_header does: the
// valid one, or of two valid ones the one with the higher sequence
// number; two with the same number must be identical (Disk2VHD writes
// such pairs).
func (img *Image) readHeaders() error {
	var valid [2]bool
	for i, off := range []int64{header1Offset, header2Offset} {
		buf := make([]byte, headerCRCSize)
		if _, err := img.f.ReadAt(buf, off); err != nil {
			return err
		}
		img.headers[i] = decodeHeader(buf)
		valid[i] = headerValid(buf)
	}
	noHeader := formats.Errorf(formats.ErrCorrupt, "No valid VHDX header found")
	switch {
	case valid[0] && !valid[1]:
		img.cur = 0
	case !valid[0] && valid[1]:
		img.cur = 1
	case !valid[0] && !valid[1]:
		return noHeader
	case img.headers[0].Sequence > img.headers[1].Sequence:
		img.cur = 0
	case img.headers[1].Sequence > img.headers[0].Sequence:
		img.cur = 1
	case img.headers[0] == img.headers[1]:
		img.cur = 0
	default:
		return noHeader
	}
	// Header updates write the other header from the current one's
	// fields (QEMU writes the stale one's, which for an invalid header
	// would be garbage).
	if !valid[0] || !valid[1] {
		img.headers[1-img.cur] = img.headers[img.cur]
	}
	return nil
}

// regionCheck refuses a range overlapping a known region, as
// vhdx_region_check.
func (img *Image) regionCheck(start, length uint64) error {
	end := start + length
	for _, r := range img.regions {
		if start < r.end && end > r.start {
			return fmt.Errorf("VHDX region %d-%d overlaps with region %d-%d", start, end, r.start, r.end)
		}
	}
	return nil
}

// readRegionTable reads the first region table (QEMU never looks at
// the second) and returns the BAT and metadata entries.
func (img *Image) readRegionTable() (bat, meta regionEntry, err error) {
	name := img.f.Name()
	buf := make([]byte, headerBlockSize)
	if _, err := img.f.ReadAt(buf, regionTable1); err != nil {
		return bat, meta, err
	}
	if !checksumValid(buf, 4) {
		return bat, meta, invalid(name, "region table checksum mismatch")
	}
	if !bytes.Equal(buf[0:4], regionSignature) {
		return bat, meta, invalid(name, "region table signature %q", buf[0:4])
	}
	count := binary.LittleEndian.Uint32(buf[8:])
	if count > maxRegionEntries {
		return bat, meta, invalid(name, "%d region table entries, at most %d allowed", count, maxRegionEntries)
	}
	var haveBAT, haveMeta bool
	for i := range int(count) {
		e := decodeRegionEntry(buf[16+i*regionEntryLen:])
		if err := img.regionCheck(e.FileOffset, uint64(e.Length)); err != nil {
			img.warnf(err.Error())
			return bat, meta, invalid(name, "%v", err)
		}
		img.regions = append(img.regions, span{e.FileOffset, e.FileOffset + uint64(e.Length)})
		switch {
		case e.GUID == batGUID:
			if haveBAT {
				return bat, meta, invalid(name, "two BAT regions")
			}
			bat, haveBAT = e, true
		case e.GUID == metadataGUID:
			if haveMeta {
				return bat, meta, invalid(name, "two metadata regions")
			}
			meta, haveMeta = e, true
		case e.Required:
			return bat, meta, unsupported(name, "unknown required region %x", e.GUID)
		}
	}
	if !haveBAT || !haveMeta {
		return bat, meta, invalid(name, "BAT or metadata region missing")
	}
	return bat, meta, nil
}

// metadata items QEMU needs, as bits of a presence mask.
const (
	metaFileParams = 1 << iota
	metaVirtualSize
	metaPage83
	metaLogicalSector
	metaPhysSector
	metaParentLocator

	metaAllRequired = metaFileParams | metaVirtualSize | metaPage83 | metaLogicalSector | metaPhysSector
)

var metaItems = []struct {
	id  guid
	bit int
}{
	{fileParamGUID, metaFileParams},
	{virtualSizeGUID, metaVirtualSize},
	{page83GUID, metaPage83},
	{logicalSectorGUID, metaLogicalSector},
	{physSectorGUID, metaPhysSector},
	{parentLocatorGUID, metaParentLocator},
}

// readMetadata parses the metadata table and the items QEMU uses, with
// vhdx_parse_metadata's checks.
func (img *Image) readMetadata(region regionEntry) error {
	name := img.f.Name()
	buf := make([]byte, metadataTableSize)
	if _, err := img.f.ReadAt(buf, int64(region.FileOffset)); err != nil {
		return err
	}
	if !bytes.Equal(buf[0:8], metadataSignature) {
		return invalid(name, "metadata signature %q", buf[0:8])
	}
	count := int(binary.LittleEndian.Uint16(buf[10:]))
	if count*metadataEntryLen > metadataTableSize-32 {
		return invalid(name, "%d metadata entries do not fit the table", count)
	}
	present := 0
	entries := map[int]metadataEntry{}
	for i := range count {
		e := decodeMetadataEntry(buf[32+i*metadataEntryLen:])
		known := false
		for _, it := range metaItems {
			if e.ItemID == it.id {
				if present&it.bit != 0 {
					return invalid(name, "metadata item %x twice", e.ItemID)
				}
				present |= it.bit
				entries[it.bit] = e
				known = true
			}
		}
		if !known && e.Flags&metaIsRequired != 0 {
			return unsupported(name, "unknown required metadata item %x", e.ItemID)
		}
	}
	if present&metaAllRequired != metaAllRequired {
		return unsupported(name, "required metadata items missing (have %#x)", present)
	}
	item := func(bit, n int) ([]byte, error) {
		b := make([]byte, n)
		_, err := img.f.ReadAt(b, int64(region.FileOffset)+int64(entries[bit].Offset))
		return b, err
	}
	params, err := item(metaFileParams, 8)
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	blockSize, bits := le.Uint32(params), le.Uint32(params[4:])
	if bits&paramHasParent != 0 {
		if present&metaParentLocator == 0 {
			return invalid(name, "has_parent without a parent locator")
		}
		loc := entries[metaParentLocator]
		if loc.Length > maxLocatorLen {
			return invalid(name, "parent locator of %d bytes", loc.Length)
		}
		b, err := item(metaParentLocator, int(loc.Length))
		if err != nil {
			return err
		}
		kv, ok := parseLocator(b)
		if !ok || parentName(kv) == "" {
			return invalid(name, "parent locator unreadable or without a path")
		}
		img.hasParent, img.parentPath = true, parentName(kv)
	}
	vs, err := item(metaVirtualSize, 8)
	if err != nil {
		return err
	}
	ls, err := item(metaLogicalSector, 4)
	if err != nil {
		return err
	}
	size, logical := le.Uint64(vs), le.Uint32(ls)
	if blockSize < blockSizeMin || blockSize > blockSizeMax || blockSize&(blockSize-1) != 0 {
		return invalid(name, "block size %d", blockSize)
	}
	if logical != 512 && logical != 4096 {
		return unsupported(name, "logical sector size %d", logical)
	}
	img.blockSize = int64(blockSize)
	img.logicalSector = int64(logical)
	img.chunkRatio = maxSectorsPerBlock * int64(logical) / int64(blockSize)
	// The spec makes the size a multiple of the logical sector size;
	// QEMU counts it in whole sectors.
	size -= size % uint64(logical)
	if size > 1<<62 {
		return invalid(name, "virtual size %d", size)
	}
	img.size = int64(size)
	return nil
}

// batEntryCount is vhdx_calc_bat_entries for an image without parent,
// in QEMU's 32-bit arithmetic (an empty image wraps to a large count).
func batEntryCount(size, blockSize, chunkRatio int64) int64 {
	blocks := uint32((uint64(size) + uint64(blockSize) - 1) / uint64(blockSize))
	shift := 0
	for int64(1)<<shift < chunkRatio {
		shift++
	}
	return int64(blocks + (blocks-1)>>shift)
}

// maxBATBytes bounds the BAT read into memory: a 64 TiB image with
// 1 MiB blocks needs 512 MiB.
const maxBATBytes = 512*miB + 4*kiB

// readBAT reads the BAT entries (rounded up to whole 4 KiB sectors, the
// unit the log rewrites).
func (img *Image) readBAT(region regionEntry) error {
	name := img.f.Name()
	img.batEntries = batEntryCount(img.size, img.blockSize, img.chunkRatio)
	if img.hasParent {
		// Every chunk has its sector bitmap entry.
		blocks := (img.size + img.blockSize - 1) / img.blockSize
		img.batEntries = (blocks + img.chunkRatio - 1) / img.chunkRatio * (img.chunkRatio + 1)
	}
	img.batOffset = int64(region.FileOffset)
	if img.batEntries > int64(region.Length)/8 {
		return invalid(name, "BAT region of %d bytes too small for %d entries", region.Length, img.batEntries)
	}
	n := (img.batEntries*8 + logSectorSize - 1) &^ (logSectorSize - 1)
	fileSize, err := img.f.Size()
	if err != nil {
		return err
	}
	if n > maxBATBytes || img.batOffset > fileSize || n > fileSize-img.batOffset+logSectorSize {
		return invalid(name, "BAT of %d bytes at %d does not fit the file (%d bytes)", n, img.batOffset, fileSize)
	}
	buf := make([]byte, n)
	if _, err := img.f.ReadAt(buf, img.batOffset); err != nil {
		return err
	}
	img.bat = make([]uint64, n/8)
	for i := range img.bat {
		img.bat[i] = binary.LittleEndian.Uint64(buf[8*i:])
	}
	return nil
}

// checkBAT is vhdx_check_bat_entries: fully present blocks must lie
// inside the file and outside the log and region table's regions. Each
// problem is reported; with count it goes on and returns how many were
// found, otherwise the first fails the open with EINVAL.
func (img *Image) checkBAT(report func(string), count bool) (int64, error) {
	fileSize, err := img.f.Size()
	if err != nil {
		return 0, err
	}
	var errs int64
	for i := int64(0); i < img.batEntries; i++ {
		e := img.bat[i]
		if e&batStateMask != blockFullyPresent {
			continue
		}
		off := e & batOffsetMask
		bitmap := (i+1)%(img.chunkRatio+1) == 0
		blockLen := img.blockSize
		if !bitmap {
			blockLen = min(img.blockSize, img.size-img.blockIndex(i)*img.blockSize)
		}
		var msgs []string
		switch {
		case off >= uint64(fileSize):
			msgs = append(msgs, fmt.Sprintf("VHDX BAT entry %d start offset %d points after end of file (%d). Image has probably been truncated.", i, off, fileSize))
		case off+uint64(blockLen) > uint64(fileSize):
			msgs = append(msgs, fmt.Sprintf("VHDX BAT entry %d end offset %d points after end of file (%d). Image has probably been truncated.", i, off+uint64(blockLen)-1, fileSize))
		}
		if !bitmap {
			if err := img.regionCheck(off, uint64(img.blockSize)); err != nil {
				msgs = append(msgs, err.Error())
			}
		}
		for _, m := range msgs {
			report(m)
			errs++
			if !count {
				return errs, invalid(img.f.Name(), "%s", m)
			}
		}
	}
	return errs, nil
}

// blockIndex turns a BAT index of a payload block into its block number.
func (img *Image) blockIndex(batIdx int64) int64 {
	return batIdx - batIdx/(img.chunkRatio+1)
}

// batIndex is the BAT index of payload block n: a sector bitmap entry
// follows every chunkRatio payload entries.
func (img *Image) batIndex(n int64) int64 { return n + n/img.chunkRatio }

// Size is the virtual size.
func (img *Image) Size() int64 { return img.size }

// Format is "vhdx".
func (img *Image) Format() string { return "vhdx" }

// Filename is the image file's name.
func (img *Image) Filename() string { return img.f.Name() }

// Describe reports the block size as the cluster size, as
// vhdx_get_info does, and QEMU's dirty flag (always clean).
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{ClusterSize: img.blockSize, HasDirtyFlag: true}, nil
}

// Flush makes completed writes durable. Metadata is written through
// the log synchronously, so only guest data can be pending.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	return img.f.Sync()
}

// Close flushes and closes the file and the parent.
func (img *Image) Close() error {
	err := img.Flush()
	if cerr := img.f.Close(); err == nil {
		err = cerr
	}
	if img.parent != nil {
		img.parent.Close()
	}
	return err
}

// errIO is what QEMU returns for requests outside the image and for
// blocks in a state it cannot read.
var errIO = formats.ErrnoError{Err: unix.EIO}

// ReadAt reads guest bytes; reads stop at Size with io.EOF.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, errIO)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), img.size-off))
	for done := 0; done < n; {
		pos := off + int64(done)
		chunk := int(min(int64(n-done), img.blockSize-pos%img.blockSize))
		if err := img.readBlock(p[done:done+chunk], pos); err != nil {
			return done, err
		}
		done += chunk
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readBlock reads p at guest offset pos, inside one block.
func (img *Image) readBlock(p []byte, pos int64) error {
	state, host, err := img.lookup(pos)
	if err != nil {
		return err
	}
	switch {
	case state == blockFullyPresent:
		_, err := img.f.ReadAt(p, host)
		return err
	case state == blockPartiallyPresent:
		return img.sectorRuns(pos, int64(len(p)), func(at, n int64, present bool) error {
			buf := p[at-pos : at-pos+n]
			if present {
				_, err := img.f.ReadAt(buf, host+at-pos)
				return err
			}
			return formats.ReadBacking(img.parent, buf, at)
		})
	case img.hasParent && state != blockZero:
		return formats.ReadBacking(img.parent, p, pos)
	}
	clear(p)
	return nil
}

// lookup returns the state of the block holding guest offset pos and,
// for a fully or partially present block, the host offset of pos.
// States QEMU cannot read (partially present without a parent, unknown
// values) are EIO.
func (img *Image) lookup(pos int64) (state int, host int64, err error) {
	idx := img.batIndex(pos / img.blockSize)
	img.mu.Lock()
	e := img.bat[idx]
	img.mu.Unlock()
	switch state := int(e & batStateMask); {
	case state == blockFullyPresent || state == blockPartiallyPresent && img.hasParent:
		return state, int64(e&batOffsetMask) + pos%img.blockSize, nil
	case state == blockNotPresent, state == blockUndefined, state == blockZero,
		state == blockUnmapped, state == blockUnmappedV095:
		return state, 0, nil
	default:
		return state, 0, fmt.Errorf("%s: block at guest offset %d in state %d: %w", img.f.Name(), pos, state, errIO)
	}
}

// BlockStatus reports the whole range of an image without parent as
// data of this layer. QEMU's vhdx driver has no block status and the
// generic answer is "data, allocated" for everything, which qemu-img map
// prints; imgfs gives the same so that map and info agree byte for byte.
// In a differencing image, which QEMU cannot open, blocks the parent
// supplies are not allocated here, so that the chain walk reaches it.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("block status of %d bytes at offset %d: %w", length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	if !img.hasParent {
		return formats.Extent{Length: length, Status: formats.StatusData}, nil
	}
	var ext formats.Extent
	for pos := off; pos < off+length; {
		n := min(off+length-pos, img.blockSize-pos%img.blockSize)
		state, host, err := img.lookup(pos)
		if err != nil {
			return formats.Extent{}, err
		}
		e := formats.Extent{Length: n}
		switch state {
		case blockFullyPresent:
			e.Status, e.Offset, e.File = formats.StatusData|formats.StatusOffsetValid, host, img.f.Name()
		case blockZero:
			e.Status = formats.StatusZero
		case blockPartiallyPresent:
			// The run of sectors at pos with pos's bit.
			first := true
			err := img.sectorRuns(pos, n, func(at, k int64, present bool) error {
				if first {
					first, e.Length = false, k
					if present {
						e.Status, e.Offset, e.File = formats.StatusData|formats.StatusOffsetValid, host, img.f.Name()
					}
				}
				return nil
			})
			if err != nil {
				return formats.Extent{}, err
			}
		}
		switch {
		case pos == off:
			ext = e
		case e.Status != ext.Status || e.Status&formats.StatusOffsetValid != 0 && e.Offset != ext.Offset+ext.Length:
			return ext, nil
		default:
			ext.Length += e.Length
		}
		if e.Length < n {
			return ext, nil
		}
		pos += n
	}
	return ext, nil
}
