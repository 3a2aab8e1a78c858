// Package dmg reads Apple disk images (UDIF) as QEMU 7.2's block/dmg.c
// does: a 512-byte "koly" trailer at the end of the file locates the
// block tables ("mish" blocks), either in a resource fork or base64 in
// the XML property list; each table lists chunks of guest sectors stored
// as zeroes, raw, zlib or bzip2 data. The format is read-only.
package dmg

import (
	"bytes"
	"compress/bzip2"
	"compress/zlib"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

const (
	sectorSize = 512
	kolySize   = 512
	kolyMagic  = 0x6b6f6c79 // "koly"
	mishMagic  = 0x6d697368 // "mish"
	// mishHeader is where a mish block's chunk entries start; each is
	// chunkEntry bytes.
	mishHeader = 204
	chunkEntry = 40
	// maxLength bounds a chunk's stored bytes and maxSectors its guest
	// sectors (QEMU's DMG_LENGTHS_MAX and DMG_SECTORCOUNTS_MAX), so one
	// chunk's buffers stay at 64 MiB.
	maxLength  = 64 << 20
	maxSectors = maxLength / sectorSize
	// maxTables bounds the property list or resource fork read whole.
	maxTables = 256 << 20
)

// Chunk types.
const (
	typeZero    = 0
	typeRaw     = 1
	typeIgnore  = 2
	typeADC     = 0x80000004
	typeZlib    = 0x80000005
	typeBzip2   = 0x80000006
	typeLZFSE   = 0x80000007
	typeComment = 0x7ffffffe
	typeEnd     = 0xffffffff
)

func init() {
	formats.Register(&formats.Driver{
		Name:     "dmg",
		Probe:    probe,
		Open:     open,
		ReadOnly: true,
	})
}

// probe is dmg_probe: the content has no magic at its start, so only the
// file name suggests the format, weakly.
func probe(_ []byte, filename string) int {
	if len(filename) > 4 && strings.HasSuffix(filename, ".dmg") {
		return 2
	}
	return 0
}

// chunk is one run of guest sectors and how it is stored.
type chunk struct {
	typ     uint32
	sector  uint64 // first guest sector
	sectors uint64
	offset  uint64 // in the file
	length  uint64
}

// Image is an open dmg image. It is safe for concurrent use.
type Image struct {
	formats.ReadOnlyBase
	chunks []chunk // sorted by sector

	// mu guards the cache of the last chunk decompressed.
	mu     sync.Mutex
	cached int
	data   []byte
}

var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
)

var errIO = formats.ErrnoError{Err: syscall.EIO}

func open(f *formats.File, _ *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// invalid is how QEMU reports most bad dmg metadata: a bare EINVAL,
// which qemu-img prints as "Could not open '<file>': Invalid argument".
// The error still says what is wrong through its kind, which wraps the
// sentinel.
func invalid(f *formats.File, sentinel error, format string, args ...any) error {
	return &formats.Error{
		Msg:  fmt.Sprintf("Could not open '%s': Invalid argument", f.Name()),
		Kind: fmt.Errorf("%s: dmg: %s: %w", f.Name(), fmt.Sprintf(format, args...), sentinel),
	}
}

func corrupt(f *formats.File, format string, args ...any) error {
	return invalid(f, formats.ErrCorrupt, format, args...)
}

// findKoly is dmg_find_koly_offset: the trailer's magic may sit anywhere
// in the last 515 bytes of the file measured in whole sectors, since
// dmg files need not be a multiple of 512 bytes long.
func findKoly(f *formats.File) (int64, error) {
	size, err := f.Size()
	if err != nil {
		return 0, err
	}
	if size < kolySize {
		return 0, formats.Errorf(formats.ErrWrongFormat, "dmg file must be at least 512 bytes long")
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	off := int64(0)
	if size > 511+512 {
		off = size - 511 - 512
	}
	buf := make([]byte, min(size, 515))
	if _, err := f.ReadAt(buf, off); err != nil {
		return 0, err
	}
	if i := bytes.Index(buf, []byte("koly")); i >= 0 {
		return off + int64(i), nil
	}
	return 0, formats.Errorf(formats.ErrWrongFormat, "Could not locate UDIF trailer in dmg file")
}

// load is dmg_open.
func load(f *formats.File) (*Image, error) {
	pos, err := findKoly(f)
	if err != nil {
		return nil, err
	}
	end := uint64(pos)
	koly := make([]byte, kolySize)
	if _, err := f.ReadAt(koly, pos); err != nil {
		return nil, err
	}
	be := binary.BigEndian
	dataFork := be.Uint64(koly[0x18:])
	rsrcOff, rsrcLen := be.Uint64(koly[0x28:]), be.Uint64(koly[0x30:])
	xmlOff, xmlLen := be.Uint64(koly[0xd8:]), be.Uint64(koly[0xe0:])
	sectors := be.Uint64(koly[0x1ec:])
	switch {
	case dataFork > end:
		return nil, corrupt(f, "data fork offset %d past the trailer at %d", dataFork, end)
	case rsrcOff >= end || rsrcLen > end-rsrcOff:
		return nil, corrupt(f, "resource fork [%d, +%d) past the trailer at %d", rsrcOff, rsrcLen, end)
	case xmlOff >= end || xmlLen > end-xmlOff:
		return nil, corrupt(f, "property list [%d, +%d) past the trailer at %d", xmlOff, xmlLen, end)
	case sectors > math.MaxInt64/sectorSize:
		return nil, corrupt(f, "sector count %d too large", sectors)
	}
	img := &Image{ReadOnlyBase: formats.ReadOnlyBase{File: f, VirtualSize: int64(sectors) * sectorSize}, cached: -1}
	p := &parser{img: img, dataFork: dataFork}
	switch {
	case rsrcLen != 0:
		err = p.resourceFork(rsrcOff, rsrcLen)
	case xmlLen != 0:
		err = p.plist(xmlOff, xmlLen)
	default:
		err = corrupt(f, "neither a resource fork nor a property list")
	}
	if err != nil {
		return nil, err
	}
	sort.SliceStable(img.chunks, func(i, j int) bool { return img.chunks[i].sector < img.chunks[j].sector })
	return img, nil
}

// parser collects the chunks of an image's mish blocks.
type parser struct {
	img      *Image
	dataFork uint64
}

// readTables reads n bytes of block tables at off, bounded by maxTables.
func (p *parser) readTables(off, n uint64, what string) ([]byte, error) {
	if n > maxTables {
		return nil, invalid(p.img.File, formats.ErrUnsupported, "%s of %d bytes larger than %d", what, n, maxTables)
	}
	buf := make([]byte, n)
	_, err := p.img.File.ReadAt(buf, int64(off))
	return buf, err
}

// resourceFork is dmg_read_resource_fork: the fork's header gives the
// offset and length of its data, which holds resources each preceded by
// a 32-bit length; the resource map after the data is ignored.
func (p *parser) resourceFork(off, n uint64) error {
	fork, err := p.readTables(off, n, "resource fork")
	if err != nil {
		return err
	}
	if n < 12 {
		return corrupt(p.img.File, "resource fork of %d bytes too short", n)
	}
	be := binary.BigEndian
	dataOff, dataLen := uint64(be.Uint32(fork)), uint64(be.Uint32(fork[8:]))
	if dataOff > n || dataLen == 0 || dataOff+dataLen > n {
		return corrupt(p.img.File, "resource data [%d, +%d) outside the fork of %d bytes", dataOff, dataLen, n)
	}
	end := dataOff + dataLen
	for pos := dataOff; pos < end; {
		if pos+4 > n {
			return corrupt(p.img.File, "resource at %d past the fork's end", pos)
		}
		count := uint64(be.Uint32(fork[pos:]))
		if count == 0 || count > end-pos || pos+4+count > n {
			return corrupt(p.img.File, "resource of %d bytes at %d outside the fork's data", count, pos)
		}
		pos += 4
		if err := p.mish(fork[pos : pos+count]); err != nil {
			return err
		}
		pos += count
	}
	return nil
}

// plist is dmg_read_plist_xml: every <data> element is base64, and those
// decoding to a mish block are block tables.
func (p *parser) plist(off, n uint64) error {
	xml, err := p.readTables(off, n, "property list")
	if err != nil {
		return err
	}
	for {
		i := bytes.Index(xml, []byte("<data>"))
		if i < 0 {
			return nil
		}
		xml = xml[i+len("<data>"):]
		j := bytes.Index(xml, []byte("</data>"))
		if j < 0 {
			return corrupt(p.img.File, "property list <data> without </data>")
		}
		// Base64 in a plist is broken into lines and indented.
		clean := bytes.Map(func(r rune) rune {
			if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
				return -1
			}
			return r
		}, xml[:j])
		mish, err := base64.StdEncoding.DecodeString(string(clean))
		if err != nil {
			return corrupt(p.img.File, "property list <data> is not base64: %v", err)
		}
		if err := p.mish(mish); err != nil {
			return err
		}
		xml = xml[j+len("</data>"):]
	}
}

// known reports whether imgfs can read a chunk type; the others
// (comments, terminators and types QEMU also lacks) are dropped, so their
// sectors are unreadable, as in QEMU. LZFSE and ADC chunks are kept so
// that reading them reports why it fails.
func known(typ uint32) bool {
	switch typ {
	case typeZero, typeRaw, typeIgnore, typeZlib, typeBzip2, typeLZFSE, typeADC:
		return true
	}
	return false
}

// mish is dmg_read_mish_block: anything that is not a mish block is
// skipped.
func (p *parser) mish(b []byte) error {
	be := binary.BigEndian
	if len(b) < mishHeader+chunkEntry || be.Uint32(b) != mishMagic {
		return nil
	}
	baseSector := be.Uint64(b[8:])
	baseOff := be.Uint64(b[24:])
	for pos := mishHeader; pos+chunkEntry <= len(b); pos += chunkEntry {
		e := b[pos:]
		c := chunk{typ: be.Uint32(e), sector: be.Uint64(e[8:]), sectors: be.Uint64(e[16:]),
			offset: be.Uint64(e[24:]), length: be.Uint64(e[32:])}
		if !known(c.typ) {
			continue
		}
		i := len(p.img.chunks)
		// Zero chunks are never expanded, so their size is free.
		if c.typ != typeZero && c.typ != typeIgnore && c.sectors > maxSectors {
			return invalid(p.img.File, formats.ErrUnsupported, "sector count %d for chunk %d is larger than max (%d)", c.sectors, i, maxSectors)
		}
		if c.length > maxLength {
			return invalid(p.img.File, formats.ErrUnsupported, "length %d for chunk %d is larger than max (%d)", c.length, i, maxLength)
		}
		c.sector += baseSector
		c.offset += p.dataFork + baseOff
		// Guest byte offsets of the chunk must fit in int64.
		if c.sector < baseSector || c.sector > math.MaxInt64/sectorSize || c.sectors > math.MaxInt64/sectorSize-c.sector {
			return corrupt(p.img.File, "chunk %d sectors overflow", i)
		}
		p.img.chunks = append(p.img.chunks, c)
	}
	return nil
}

func (img *Image) Format() string { return "dmg" }

// find returns the index of the chunk holding guest sector s, or -1.
func (img *Image) find(s uint64) int {
	i := sort.Search(len(img.chunks), func(i int) bool { return img.chunks[i].sector > s }) - 1
	if i < 0 || s-img.chunks[i].sector >= img.chunks[i].sectors {
		return -1
	}
	return i
}

// load decompresses chunk i into the cache. The caller holds mu.
func (img *Image) load(i int) ([]byte, error) {
	if img.cached == i {
		return img.data, nil
	}
	c := img.chunks[i]
	stored := make([]byte, c.length)
	if _, err := img.File.ReadAt(stored, int64(c.offset)); err != nil {
		return nil, err
	}
	n := int(c.sectors * sectorSize)
	if cap(img.data) < n {
		img.data = make([]byte, n)
	}
	out := img.data[:n]
	img.cached = -1
	var err error
	switch c.typ {
	case typeRaw:
		// A short raw chunk reads as zeroes after its data.
		clear(out[copy(out, stored):])
	case typeZlib:
		var zr io.ReadCloser
		if zr, err = zlib.NewReader(bytes.NewReader(stored)); err == nil {
			err = readExactly(zr, out)
		}
	case typeBzip2:
		err = readExactly(bzip2.NewReader(bytes.NewReader(stored)), out)
	default:
		return nil, fmt.Errorf("%s: dmg: chunk %d at sector %d has type %#x (%s), which imgfs cannot decompress: %w",
			img.File.Name(), i, c.sector, c.typ, typeName(c.typ), formats.ErrUnsupported)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: dmg: chunk %d at sector %d: %v: %w", img.File.Name(), i, c.sector, err, errIO)
	}
	img.cached = i
	return out, nil
}

func typeName(t uint32) string {
	switch t {
	case typeLZFSE:
		return "lzfse"
	case typeADC:
		return "ADC"
	}
	return "unknown"
}

// readExactly fills out from r and requires the stream to end there, as
// QEMU requires the exact chunk size out.
func readExactly(r io.Reader, out []byte) error {
	if _, err := io.ReadFull(r, out); err != nil {
		return err
	}
	var one [1]byte
	if n, err := r.Read(one[:]); n != 0 || err != io.EOF {
		return fmt.Errorf("chunk decompresses to more than %d bytes", len(out))
	}
	return nil
}

// ReadAt reads guest bytes. Sectors no chunk covers fail, as in QEMU.
// Chunks vary in size, so each piece ends where its chunk does.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	return formats.ReadBlocks(img.File.Name(), p, off, img.VirtualSize, 0, func(q []byte, pos int64) (int, error) {
		i := img.find(uint64(pos / sectorSize))
		if i < 0 {
			return 0, fmt.Errorf("%s: dmg: no chunk holds sector %d: %w", img.File.Name(), pos/sectorSize, errIO)
		}
		c := img.chunks[i]
		rel := pos - int64(c.sector)*sectorSize
		q = q[:min(int64(len(q)), int64(c.sectors)*sectorSize-rel)]
		if c.typ == typeZero || c.typ == typeIgnore {
			clear(q)
			return len(q), nil
		}
		data, err := img.load(i)
		if err != nil {
			return 0, err
		}
		return copy(q, data[rel:]), nil
	})
}
