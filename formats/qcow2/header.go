// Package qcow2 implements QEMU's qcow2 image format (versions 2 and 3),
// as specified in QEMU's docs/interop/qcow2.txt: reading, writing,
// creation, backing files, compressed clusters (deflate and zstd),
// extended L2 entries, external data files, snapshots and bitmaps as far
// as `qemu-img info` reports them.
package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// Magic is "QFI\xfb".
const Magic = 0x514649fb

// Header field sizes and limits.
const (
	// headerV2Len is the fixed size of a version 2 header.
	headerV2Len = 72
	// headerV3MinLen is the smallest header_length a version 3 image may
	// declare (everything up to and including header_length itself).
	headerV3MinLen = 104
	// headerV3Len is the header QEMU 7.2 writes: the v3 fields plus the
	// compression type byte and 7 bytes of padding. Bytes beyond it are
	// unknown fields that must survive a header rewrite.
	headerV3Len = 112

	minClusterBits = 9
	maxClusterBits = 21
	// minClusterBitsExtL2: a subcluster (1/32 of a cluster) is at least
	// 512 bytes.
	minClusterBitsExtL2 = 14

	// maxL1Bytes, maxRefcountTableBytes, ...: limits against hostile
	// images, the same QEMU enforces (QCOW_MAX_L1_SIZE etc.).
	maxL1Bytes            = 32 << 20
	maxRefcountTableBytes = 8 << 20
	maxSnapshots          = 65536
	maxSnapshotTableBytes = 64 << 20
	maxSnapshotExtraData  = 1024
	maxBitmaps            = 65535
	maxBitmapDirBytes     = maxBitmaps * 1024
	maxBackingNameLen     = 1023
	// maxHostOffset: host offsets are 56-bit (L2E_OFFSET_MASK).
	maxHostOffset = 1 << 56
)

// Incompatible, compatible and autoclear feature bits.
const (
	IncompatDirty           = 1 << 0
	IncompatCorrupt         = 1 << 1
	IncompatDataFile        = 1 << 2
	IncompatCompressionType = 1 << 3
	IncompatExtendedL2      = 1 << 4
	incompatKnown           = IncompatDirty | IncompatCorrupt | IncompatDataFile |
		IncompatCompressionType | IncompatExtendedL2

	CompatLazyRefcounts = 1 << 0

	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
	autoclearKnown       = AutoclearBitmaps | AutoclearDataFileRaw
)

// Compression types (header byte 104).
const (
	CompressionZlib = 0
	CompressionZstd = 1
)

// Header extension types.
const (
	ExtEnd           = 0x00000000
	ExtBackingFormat = 0xe2792aca
	ExtFeatureTable  = 0x6803f857
	ExtBitmaps       = 0x23852875
	ExtCrypto        = 0x0537be77
	ExtDataFile      = 0x44415441
)

// Header is a decoded qcow2 header with its extensions. Fields named
// after docs/interop/qcow2.txt. Version 2 images read with the v3 fields
// at their implied values (no features, refcount order 4, length 72).
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64

	IncompatibleFeatures uint64
	CompatibleFeatures   uint64
	AutoclearFeatures    uint64
	RefcountOrder        uint32
	HeaderLength         uint32
	// CompressionType is meaningful only when HeaderLength > 104.
	CompressionType uint8

	// UnknownFields are the header bytes from headerV3Len up to
	// HeaderLength, preserved verbatim.
	UnknownFields []byte

	// From the header extensions and the backing file name area.
	BackingFile   string
	BackingFormat string
	DataFile      string
	// HasDataFileExt: the data file extension is present (its name may
	// be empty, which QEMU then requires from the open options).
	HasDataFileExt bool
	FeatureNames   []FeatureName
	// Bitmaps is the bitmaps extension, nil when absent or ignored.
	Bitmaps *BitmapsExt
	// CryptoExt is the full disk encryption header extension's data, nil
	// when absent; kept verbatim (encryption is not interpreted here).
	CryptoExt []byte
	// Unknown are extensions this driver does not interpret, kept in
	// their original order to be written back on a header rewrite.
	Unknown []Extension
	// Warnings are QEMU's open-time warnings about the extensions
	// (e.g. bitmaps written by a program without bitmap support).
	Warnings []string
}

// Extension is a raw header extension.
type Extension struct {
	Type uint32
	Data []byte
}

// FeatureName is one entry of the feature name table extension.
type FeatureName struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

// BitmapsExt is the bitmaps header extension.
type BitmapsExt struct {
	NbBitmaps     uint32
	DirectorySize uint64
	DirectoryOff  uint64
}

// qerr is an error whose text is exactly QEMU's message while it still
// unwraps to a formats sentinel, so callers can both print it verbatim and
// test it with errors.Is.
type qerr struct {
	msg  string
	kind error
}

func (e *qerr) Error() string { return e.msg }
func (e *qerr) Unwrap() error { return e.kind }

// errorf formats a QEMU-worded message and tags it with kind.
func errorf(kind error, format string, args ...any) error {
	return &qerr{msg: fmt.Sprintf(format, args...), kind: kind}
}

// DecodeHeader parses the fixed header from buf, which must hold at least
// the first headerV2Len bytes of the file (and HeaderLength bytes for v3).
// It checks what QEMU checks before looking at extensions; the feature
// bits are checked by CheckFeatures. Extensions are parsed separately by
// DecodeExtensions because they may lie anywhere in the first cluster.
func DecodeHeader(buf []byte) (*Header, error) {
	if len(buf) < headerV2Len || binary.BigEndian.Uint32(buf) != Magic {
		return nil, errorf(formats.ErrWrongFormat, "Image is not in qcow2 format")
	}
	be := binary.BigEndian
	h := &Header{
		Version:               be.Uint32(buf[4:]),
		BackingFileOffset:     be.Uint64(buf[8:]),
		BackingFileSize:       be.Uint32(buf[16:]),
		ClusterBits:           be.Uint32(buf[20:]),
		Size:                  be.Uint64(buf[24:]),
		CryptMethod:           be.Uint32(buf[32:]),
		L1Size:                be.Uint32(buf[36:]),
		L1TableOffset:         be.Uint64(buf[40:]),
		RefcountTableOffset:   be.Uint64(buf[48:]),
		RefcountTableClusters: be.Uint32(buf[56:]),
		NbSnapshots:           be.Uint32(buf[60:]),
		SnapshotsOffset:       be.Uint64(buf[64:]),
	}
	if h.Version < 2 || h.Version > 3 {
		return nil, errorf(formats.ErrUnsupported, "Unsupported qcow2 version %d", h.Version)
	}
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, errorf(formats.ErrUnsupported, "Unsupported cluster size: 2^%d", h.ClusterBits)
	}
	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = headerV2Len
	} else {
		if len(buf) < headerV3MinLen {
			return nil, errorf(formats.ErrCorrupt, "qcow2 header too short")
		}
		h.IncompatibleFeatures = be.Uint64(buf[72:])
		h.CompatibleFeatures = be.Uint64(buf[80:])
		h.AutoclearFeatures = be.Uint64(buf[88:])
		h.RefcountOrder = be.Uint32(buf[96:])
		h.HeaderLength = be.Uint32(buf[100:])
		if h.HeaderLength < headerV3MinLen {
			return nil, errorf(formats.ErrCorrupt, "qcow2 header too short")
		}
		if uint64(h.HeaderLength) > h.ClusterSize() {
			return nil, errorf(formats.ErrCorrupt, "qcow2 header exceeds cluster size")
		}
		if uint64(len(buf)) < uint64(h.HeaderLength) {
			return nil, errorf(formats.ErrCorrupt, "qcow2 header too short")
		}
		if h.HeaderLength > headerV3MinLen {
			h.CompressionType = buf[104]
		}
		if h.HeaderLength > headerV3Len {
			h.UnknownFields = append([]byte(nil), buf[headerV3Len:h.HeaderLength]...)
		}
	}
	if h.BackingFileOffset > h.ClusterSize() {
		return nil, errorf(formats.ErrCorrupt, "Invalid backing file offset")
	}
	return h, nil
}

// ClusterSize is 1 << ClusterBits.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// ExtendedL2 reports whether L2 entries are 16 bytes with subclusters.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// extensionsEnd is where header extensions must stop: the backing file
// name when there is one, otherwise the end of the first cluster.
func (h *Header) extensionsEnd() uint64 {
	if h.BackingFileOffset != 0 {
		return h.BackingFileOffset
	}
	return h.ClusterSize()
}

// DecodeExtensions parses the header extensions and the backing file name
// from the image's first cluster (cluster may be shorter when the file
// is; missing bytes are treated as zeroes by the caller's read).
func (h *Header) DecodeExtensions(cluster []byte) error {
	be := binary.BigEndian
	off := uint64(h.HeaderLength)
	end := min(h.extensionsEnd(), uint64(len(cluster)))
	for off < end {
		if end-off < 8 {
			return errorf(formats.ErrCorrupt, "qcow2_read_extension: ERROR: pread fail from offset %d", off)
		}
		typ := be.Uint32(cluster[off:])
		n := uint64(be.Uint32(cluster[off+4:]))
		off += 8
		if n > end-off {
			return errorf(formats.ErrCorrupt, "Header extension too large")
		}
		data := cluster[off : off+n]
		switch typ {
		case ExtEnd:
			return h.decodeBackingName(cluster)
		case ExtBackingFormat:
			if n >= 16 {
				return errorf(formats.ErrCorrupt, "ERROR: ext_backing_format: len=%d too large (>=16)", n)
			}
			h.BackingFormat = cString(data)
		case ExtFeatureTable:
			for i := 0; i+48 <= len(data); i += 48 {
				h.FeatureNames = append(h.FeatureNames, FeatureName{
					Type: data[i], Bit: data[i+1], Name: cString(data[i+2 : i+48]),
				})
			}
		case ExtCrypto:
			h.CryptoExt = append([]byte{}, data...)
		case ExtBitmaps:
			if err := h.decodeBitmapsExt(data); err != nil {
				return err
			}
		case ExtDataFile:
			h.HasDataFileExt = true
			h.DataFile = string(data)
		default:
			h.Unknown = append(h.Unknown, Extension{Type: typ, Data: append([]byte(nil), data...)})
		}
		off += (n + 7) &^ 7
	}
	return h.decodeBackingName(cluster)
}

func (h *Header) decodeBitmapsExt(data []byte) error {
	if len(data) != 24 {
		return errorf(formats.ErrCorrupt, "bitmaps_ext: Invalid extension length")
	}
	if h.AutoclearFeatures&AutoclearBitmaps == 0 {
		h.Warnings = append(h.Warnings, "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent")
		return nil
	}
	be := binary.BigEndian
	ext := &BitmapsExt{
		NbBitmaps:     be.Uint32(data[0:]),
		DirectorySize: be.Uint64(data[8:]),
		DirectoryOff:  be.Uint64(data[16:]),
	}
	if be.Uint32(data[4:]) != 0 {
		return errorf(formats.ErrCorrupt, "bitmaps_ext: Reserved field is not zero")
	}
	if ext.NbBitmaps > maxBitmaps {
		return errorf(formats.ErrCorrupt, "bitmaps_ext: Image has %d bitmaps, exceeding the QEMU supported maximum of %d", ext.NbBitmaps, maxBitmaps)
	}
	if ext.NbBitmaps == 0 {
		return errorf(formats.ErrCorrupt, "found bitmaps extension with zero bitmaps")
	}
	if ext.DirectoryOff&(h.ClusterSize()-1) != 0 {
		return errorf(formats.ErrCorrupt, "bitmaps_ext: invalid bitmap directory offset")
	}
	if ext.DirectorySize > maxBitmapDirBytes {
		return errorf(formats.ErrCorrupt, "bitmaps_ext: bitmap directory size (%d) exceeds the maximum supported size (%d)", ext.DirectorySize, maxBitmapDirBytes)
	}
	h.Bitmaps = ext
	return nil
}

func (h *Header) decodeBackingName(cluster []byte) error {
	if h.BackingFileOffset == 0 {
		return nil
	}
	n := uint64(h.BackingFileSize)
	if n > maxBackingNameLen || n > h.ClusterSize()-h.BackingFileOffset {
		return errorf(formats.ErrCorrupt, "Backing file name too long")
	}
	if h.BackingFileOffset+n > uint64(len(cluster)) {
		return errorf(formats.ErrCorrupt, "Could not read backing file name")
	}
	h.BackingFile = string(cluster[h.BackingFileOffset : h.BackingFileOffset+n])
	return nil
}

// cString returns b up to its first NUL.
func cString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// CheckFeatures refuses images with incompatible features this driver
// does not know, naming them from the feature table as QEMU does.
func (h *Header) CheckFeatures() error {
	unknown := h.IncompatibleFeatures &^ incompatKnown
	if unknown == 0 {
		return nil
	}
	var parts []string
	for _, f := range h.FeatureNames {
		if f.Type == 0 && f.Bit < 64 && unknown&(1<<f.Bit) != 0 {
			parts = append(parts, f.Name)
			unknown &^= 1 << f.Bit
		}
	}
	if unknown != 0 {
		parts = append(parts, fmt.Sprintf("Unknown incompatible feature: %x", unknown))
	}
	return errorf(formats.ErrUnsupported, "Unsupported qcow2 feature(s): %s", strings.Join(parts, ", "))
}

// Encode renders the fixed header (HeaderLength bytes, or 72 for v2),
// followed by the extensions and the backing file name, into a zeroed
// buffer of one cluster, as QEMU writes the header cluster. It sets the
// backing file offset and size. It returns an error when they do not fit.
func (h *Header) Encode() ([]byte, error) {
	cs := h.ClusterSize()
	buf := make([]byte, cs)
	be := binary.BigEndian
	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint32(buf[16:], h.BackingFileSize)
	be.PutUint32(buf[20:], h.ClusterBits)
	be.PutUint64(buf[24:], h.Size)
	be.PutUint32(buf[32:], h.CryptMethod)
	be.PutUint32(buf[36:], h.L1Size)
	be.PutUint64(buf[40:], h.L1TableOffset)
	be.PutUint64(buf[48:], h.RefcountTableOffset)
	be.PutUint32(buf[56:], h.RefcountTableClusters)
	be.PutUint32(buf[60:], h.NbSnapshots)
	be.PutUint64(buf[64:], h.SnapshotsOffset)
	off := uint64(headerV2Len)
	if h.Version >= 3 {
		be.PutUint64(buf[72:], h.IncompatibleFeatures)
		be.PutUint64(buf[80:], h.CompatibleFeatures)
		be.PutUint64(buf[88:], h.AutoclearFeatures)
		be.PutUint32(buf[96:], h.RefcountOrder)
		be.PutUint32(buf[100:], h.HeaderLength)
		if h.HeaderLength > headerV3MinLen {
			buf[104] = h.CompressionType
		}
		copy(buf[headerV3Len:], h.UnknownFields)
		off = uint64(h.HeaderLength)
	}
	put := func(typ uint32, data []byte) error {
		padded := (uint64(len(data)) + 7) &^ 7
		if off+8+padded > cs {
			return errorf(formats.ErrInvalidOption, "Header extensions do not fit in the first cluster")
		}
		be.PutUint32(buf[off:], typ)
		be.PutUint32(buf[off+4:], uint32(len(data)))
		copy(buf[off+8:], data)
		off += 8 + padded
		return nil
	}
	// QEMU's order (qcow2_update_header): backing format, data file,
	// full disk encryption, feature table (v3), bitmaps, unknown ones.
	if h.BackingFormat != "" {
		if err := put(ExtBackingFormat, []byte(h.BackingFormat)); err != nil {
			return nil, err
		}
	}
	if h.HasDataFileExt {
		if err := put(ExtDataFile, []byte(h.DataFile)); err != nil {
			return nil, err
		}
	}
	if h.CryptoExt != nil {
		if err := put(ExtCrypto, h.CryptoExt); err != nil {
			return nil, err
		}
	}
	// QEMU 7.2 leaves the feature table out of images with clusters of
	// 4 KiB and less, where it would crowd out the backing file name.
	if h.Version >= 3 && cs > 4096 {
		if err := put(ExtFeatureTable, encodeFeatureTable()); err != nil {
			return nil, err
		}
	}
	if h.Bitmaps != nil {
		b := make([]byte, 24)
		be.PutUint32(b[0:], h.Bitmaps.NbBitmaps)
		be.PutUint64(b[8:], h.Bitmaps.DirectorySize)
		be.PutUint64(b[16:], h.Bitmaps.DirectoryOff)
		if err := put(ExtBitmaps, b); err != nil {
			return nil, err
		}
	}
	for _, e := range h.Unknown {
		if err := put(e.Type, e.Data); err != nil {
			return nil, err
		}
	}
	// End of extensions marker: 8 zero bytes, already zero in buf.
	off += 8
	if h.BackingFile != "" {
		n := uint64(len(h.BackingFile))
		if n > maxBackingNameLen || off+n > cs {
			return nil, errorf(formats.ErrInvalidOption, "Backing file name too long")
		}
		copy(buf[off:], h.BackingFile)
		h.BackingFileOffset = off
		h.BackingFileSize = uint32(n)
		off += n
	} else {
		h.BackingFileOffset, h.BackingFileSize = 0, 0
	}
	be.PutUint64(buf[8:], h.BackingFileOffset)
	be.PutUint32(buf[16:], h.BackingFileSize)
	return buf, nil
}

// featureTable is the feature name table QEMU writes into v3 images.
var featureTable = []FeatureName{
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
}

func encodeFeatureTable() []byte {
	b := make([]byte, 48*len(featureTable))
	for i, f := range featureTable {
		b[48*i] = f.Type
		b[48*i+1] = f.Bit
		copy(b[48*i+2:48*i+48], f.Name)
	}
	return b
}

// Layout is the geometry derived from a header: sizes of clusters, L2
// tables and refcount blocks, and the compressed descriptor split.
type Layout struct {
	ClusterBits uint32
	ClusterSize int64
	// L2Bits is log2 of the entries per L2 table; L2Entries that count;
	// L2EntrySize 8, or 16 with extended L2.
	L2Bits      uint32
	L2Entries   int64
	L2EntrySize int64
	ExtendedL2  bool
	// SubclusterSize is ClusterSize/32 with extended L2, else ClusterSize.
	SubclusterSize int64
	Subclusters    int64
	// RefcountOrder is log2 of the refcount width in bits.
	RefcountOrder uint32
	RefcountBits  int64
	// RefblockBits is log2 of the entries per refcount block;
	// RefblockEntries that count.
	RefblockBits    uint32
	RefblockEntries int64
	// Compressed descriptors: bits [0, CsizeShift) are the host offset,
	// the CsizeMask bits above are the extra 512-byte sector count.
	CsizeShift uint32
	CsizeMask  uint64
	// HasDataFile: guest data lives in an external data file, where host
	// offset 0 is valid.
	HasDataFile bool
}

// NewLayout derives the geometry from a header whose cluster bits were
// validated by DecodeHeader.
func NewLayout(h *Header) Layout {
	l := Layout{
		ClusterBits:   h.ClusterBits,
		ClusterSize:   1 << h.ClusterBits,
		ExtendedL2:    h.ExtendedL2(),
		RefcountOrder: h.RefcountOrder,
		RefcountBits:  1 << h.RefcountOrder,
		CsizeShift:    62 - (h.ClusterBits - 8),
		CsizeMask:     1<<(h.ClusterBits-8) - 1,
		HasDataFile:   h.IncompatibleFeatures&IncompatDataFile != 0,
	}
	l.L2EntrySize = 8
	l.Subclusters = 1
	if l.ExtendedL2 {
		l.L2EntrySize = 16
		l.Subclusters = 32
	}
	l.SubclusterSize = l.ClusterSize / l.Subclusters
	l.L2Bits = h.ClusterBits - 3
	if l.ExtendedL2 {
		l.L2Bits--
	}
	l.L2Entries = 1 << l.L2Bits
	// RefcountOrder <= 6 is checked by the caller; clamp so a hostile
	// value cannot make the shift negative before that check runs.
	l.RefblockBits = h.ClusterBits + 3 - min(h.RefcountOrder, 6)
	l.RefblockEntries = 1 << l.RefblockBits
	return l
}

// L1Coverage is how many guest bytes one L1 entry maps.
func (l *Layout) L1Coverage() int64 { return l.ClusterSize << l.L2Bits }

// L1Index and L2Index locate a guest offset in the tables.
func (l *Layout) L1Index(guest int64) int64 { return guest >> (l.ClusterBits + l.L2Bits) }
func (l *Layout) L2Index(guest int64) int64 {
	return (guest >> l.ClusterBits) & (l.L2Entries - 1)
}

// L1SizeFor is the number of L1 entries needed for a virtual size.
func (l *Layout) L1SizeFor(size int64) int64 {
	if size <= 0 {
		return 0
	}
	return (size-1)/l.L1Coverage() + 1
}

// Table entry bits (QCOW_OFLAG_*, L1E/L2E masks).
const (
	OflagCopied     = 1 << 63
	OflagCompressed = 1 << 62
	OflagZero       = 1 << 0
	// OffsetMask selects the host offset of L1 entries and standard L2
	// entries: bits 9..55.
	OffsetMask = 0x00fffffffffffe00
	// L1Reserved are the L1 entry bits that must be zero.
	L1Reserved = 0x7f000000000001ff
	// L2Reserved are the bits that must be zero in a standard L2 entry
	// (bit 0 is the zero flag, except with extended L2 where it is
	// reserved too).
	L2Reserved = 0x3f000000000001fe
)

// ClusterType is what an L2 entry (or, with extended L2, one subcluster
// of it) says about guest data, as QEMU's QCow2SubclusterType.
type ClusterType int

const (
	// Unallocated: read from the backing file (or zeroes); no host
	// cluster.
	Unallocated ClusterType = iota
	// UnallocatedAlloc: subcluster not allocated although its cluster
	// has a host cluster (extended L2 only); reads go to the backing file.
	UnallocatedAlloc
	// ZeroPlain: reads as zeroes, no host cluster.
	ZeroPlain
	// ZeroAlloc: reads as zeroes, a host cluster is reserved.
	ZeroAlloc
	// Normal: data in the host cluster.
	Normal
	// Compressed: a compressed cluster at a byte-granular host offset.
	Compressed
	// Invalid: an impossible combination of bits (extended L2).
	Invalid
)

// L2Entry is a decoded L2 entry. With standard L2 tables Bitmap is 0.
type L2Entry struct {
	Raw    uint64
	Bitmap uint64
}

// Compressed reports whether the entry describes a compressed cluster.
func (e L2Entry) Compressed() bool { return e.Raw&OflagCompressed != 0 }

// Copied reports the COPIED flag (refcount is exactly one).
func (e L2Entry) Copied() bool { return e.Raw&OflagCopied != 0 }

// HostOffset is the host cluster offset of a non-compressed entry.
func (e L2Entry) HostOffset() uint64 { return e.Raw & OffsetMask }

// ClusterType classifies the whole entry as QEMU's
// qcow2_get_cluster_type: Unallocated, ZeroPlain, ZeroAlloc, Normal or
// Compressed. With extended L2 the zero flag does not exist.
func (l *Layout) ClusterType(e L2Entry) ClusterType {
	switch {
	case e.Compressed():
		return Compressed
	case e.Raw&OflagZero != 0 && !l.ExtendedL2:
		if e.HostOffset() != 0 {
			return ZeroAlloc
		}
		return ZeroPlain
	case e.HostOffset() == 0:
		// Offset 0 is valid in an external data file; there every
		// cluster has refcount 1, so COPIED tells it from unallocated.
		if l.HasDataFile && e.Copied() {
			return Normal
		}
		return Unallocated
	}
	return Normal
}

// SubclusterType classifies subcluster sc (0..Subclusters-1) of an
// entry as QEMU's qcow2_get_subcluster_type.
func (l *Layout) SubclusterType(e L2Entry, sc int) ClusterType {
	t := l.ClusterType(e)
	if !l.ExtendedL2 {
		return t
	}
	alloc := e.Bitmap & (1 << sc)
	zero := e.Bitmap & (1 << (32 + sc))
	switch t {
	case Compressed:
		return Compressed
	case Normal:
		switch {
		case (e.Bitmap>>32)&e.Bitmap != 0:
			return Invalid
		case zero != 0:
			return ZeroAlloc
		case alloc != 0:
			return Normal
		}
		return UnallocatedAlloc
	}
	// Unallocated cluster.
	switch {
	case e.Bitmap&0xffffffff != 0:
		return Invalid
	case zero != 0:
		return ZeroPlain
	}
	return Unallocated
}

// CompressedDescriptor splits a compressed L2 entry into the host byte
// offset of the data and the number of bytes to read (which may cross
// into the next host cluster), as QEMU's qcow2_parse_compressed_l2_entry.
func (l *Layout) CompressedDescriptor(e L2Entry) (hostOff uint64, size int64) {
	offMask := uint64(1)<<l.CsizeShift - 1
	hostOff = e.Raw & offMask
	sectors := (e.Raw>>l.CsizeShift)&l.CsizeMask + 1
	size = int64(sectors*512 - hostOff&511)
	return hostOff, size
}

// EncodeCompressed builds a compressed L2 entry for data of n bytes at
// host byte offset hostOff, as QEMU's qcow2_alloc_compressed_cluster_offset.
func (l *Layout) EncodeCompressed(hostOff uint64, n int64) uint64 {
	nbCsectors := (hostOff+uint64(n)-1)/512 - hostOff/512
	return OflagCompressed | nbCsectors<<l.CsizeShift | hostOff
}

// ReadL2Entry decodes entry i of an L2 table.
func (l *Layout) ReadL2Entry(table []byte, i int64) L2Entry {
	off := i * l.L2EntrySize
	e := L2Entry{Raw: binary.BigEndian.Uint64(table[off:])}
	if l.ExtendedL2 {
		e.Bitmap = binary.BigEndian.Uint64(table[off+8:])
	}
	return e
}

// zeroEntries counts the all-zero entries of an L2 table from entry i
// on, up to limit of them.
func (l *Layout) zeroEntries(table []byte, i, limit int64) int64 {
	b := table[i*l.L2EntrySize : min(i+limit, l.L2Entries)*l.L2EntrySize]
	n := 0
	for n+len(zeroBlock) <= len(b) && bytes.Equal(b[n:n+len(zeroBlock)], zeroBlock[:]) {
		n += len(zeroBlock) // vectorised: tables of 16 TiB images are mostly zero
	}
	for n < len(b) && binary.NativeEndian.Uint64(b[n:]) == 0 {
		n += 8
	}
	return int64(n) / l.L2EntrySize
}

var zeroBlock [256]byte

// tableSegment is the unit in which storeTable leaves out zeroes of a
// metadata table: a page, or the whole table when smaller, and at most a
// 64th of it so that a uint64 has a bit per segment.
func (l *Layout) tableSegment() int64 { return max(l.ClusterSize/64, min(l.ClusterSize, 4096)) }

// WriteL2Entry stores entry i of an L2 table.
func (l *Layout) WriteL2Entry(table []byte, i int64, e L2Entry) {
	off := i * l.L2EntrySize
	binary.BigEndian.PutUint64(table[off:], e.Raw)
	if l.ExtendedL2 {
		binary.BigEndian.PutUint64(table[off+8:], e.Bitmap)
	}
}

// GetRefcount reads entry i of a refcount block with refcount width
// 1<<order bits. Sub-byte widths pack from the least significant bit.
func GetRefcount(block []byte, i int64, order uint32) uint64 {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		perByte := 8 / bits
		shift := uint((i % perByte) * bits)
		return uint64(block[i/perByte]>>shift) & (1<<bits - 1)
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(block[2*i:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(block[4*i:]))
	}
	return binary.BigEndian.Uint64(block[8*i:])
}

// SetRefcount stores v (which must fit the width) in entry i.
func SetRefcount(block []byte, i int64, order uint32, v uint64) {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		perByte := 8 / bits
		shift := uint((i % perByte) * bits)
		mask := byte(1<<bits-1) << shift
		block[i/perByte] = block[i/perByte]&^mask | byte(v)<<shift&mask
	case 3:
		block[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(block[2*i:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(block[4*i:], uint32(v))
	default:
		binary.BigEndian.PutUint64(block[8*i:], v)
	}
}

// MaxRefcount is the largest refcount a width can hold.
func MaxRefcount(order uint32) uint64 {
	if order >= 6 {
		return ^uint64(0)
	}
	return 1<<(uint64(1)<<order) - 1
}
