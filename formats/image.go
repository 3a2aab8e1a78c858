// Package formats defines what a disk image is to imgfs: the Image
// interface every driver implements, the optional capabilities a driver
// may add, the driver registry with format probing, backing chains, and
// qemu-style creation options.
//
// A driver lives in its own subpackage (formats/raw, formats/qcow2, ...)
// and registers itself from init. It knows its on-disk layout and nothing
// about the command line or FUSE.
package formats

import (
	"context"
	"io"
)

// Image is an open disk image: the guest-visible bytes, addressed by guest
// offset. Implementations are safe for concurrent use. Reads past Size
// return io.EOF; reads of unallocated ranges fall through to the backing
// image or return zeroes.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Size is the virtual size in bytes.
	Size() int64
	// BlockStatus describes the longest run of bytes starting at off (at
	// most length bytes, never past Size) that share one status in this
	// layer alone: a driver does not look into its backing image here.
	// The chain walk is formats.ChainStatus.
	BlockStatus(off, length int64) (Extent, error)
	// Flush makes every completed write durable.
	Flush() error
	Close() error
	// Format is the driver name ("qcow2", "raw", ...).
	Format() string
	// Filename is the name the image was opened by.
	Filename() string
}

// Status flags of an Extent, modelled on QEMU's BDRV_BLOCK_* bits.
type Status uint8

const (
	// StatusData: reads return data stored by this layer.
	StatusData Status = 1 << iota
	// StatusZero: reads return zeroes.
	StatusZero
	// StatusOffsetValid: Extent.Offset is the host offset of the data in
	// Extent.File (a raw mapping qemu-img map reports).
	StatusOffsetValid
	// StatusCompressed: the data is stored compressed.
	StatusCompressed
)

// Allocated reports whether this layer decides the content of the range
// (QEMU's BDRV_BLOCK_ALLOCATED); otherwise the backing image does.
func (s Status) Allocated() bool { return s&(StatusData|StatusZero) != 0 }

// Extent is one run of BlockStatus.
type Extent struct {
	Length int64
	Status Status
	// Offset is the host offset of the first byte when StatusOffsetValid.
	Offset int64
	// File is the host file Offset refers to, when StatusOffsetValid.
	File string
}

// Backed is implemented by images that can have a backing image.
type Backed interface {
	// Backing returns the open backing image, or nil.
	Backing() Image
	// BackingInfo returns the backing file name and format as stored in
	// the image header ("" when none), even when the backing image was
	// not opened.
	BackingInfo() (name, format string)
}

// Zeroer writes zeroes efficiently. With mayUnmap the driver may
// deallocate the range as long as it still reads as zeroes.
type Zeroer interface {
	WriteZeroes(off, length int64, mayUnmap bool) error
}

// ZeroInitReporter is implemented by images that may not read as zeroes
// when new (QEMU's bdrv_has_zero_init): a new LUKS image's sectors
// decrypt to noise, so convert must write its zero ranges. Images
// without it read as zeroes when new.
type ZeroInitReporter interface {
	HasZeroInit() bool
}

// Discarder drops the data in a range. Afterwards the range reads as
// zeroes or, for images with a backing file, as the backing data.
type Discarder interface {
	Discard(off, length int64) error
}

// Resizer changes the virtual size.
type Resizer interface {
	Resize(size int64, prealloc string, shrink bool) error
}

// Describer reports what `qemu-img info` shows about an image beyond
// size, format and file name.
type Describer interface {
	Describe() (*Description, error)
}

// Description is the driver-specific part of an image's info.
type Description struct {
	ClusterSize int64 // 0 when the format has none
	Encrypted   bool
	// DirtyFlag is reported only when HasDirtyFlag.
	HasDirtyFlag bool
	DirtyFlag    bool
	Snapshots    []Snapshot
	// FormatSpecific is the ImageInfoSpecific data, e.g. the qcow2
	// compat level; nil when the format has none.
	FormatSpecific *Specific
}

// Specific is a QAPI ImageInfoSpecific union: a type name and its data.
type Specific struct {
	Type string
	Data Object
}

// Snapshot is one internal snapshot as `info` and `snapshot -l` list it.
type Snapshot struct {
	ID          string
	Name        string
	VMStateSize uint64
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	ICount      uint64 // valid when HasICount
	HasICount   bool
}

// CheckMode selects what Check repairs.
type CheckMode int

const (
	CheckReadOnly CheckMode = iota
	// CheckFixLeaks repairs leaked clusters (`-r leaks`).
	CheckFixLeaks
	// CheckFixAll repairs leaks and errors (`-r all`).
	CheckFixAll
)

// Checker verifies (and optionally repairs) an image's metadata.
type Checker interface {
	Check(ctx context.Context, mode CheckMode, report func(msg string)) (*CheckResult, error)
}

// CheckResult mirrors QEMU's BdrvCheckResult.
type CheckResult struct {
	Corruptions        int64
	Leaks              int64
	CheckErrors        int64
	CorruptionsFixed   int64
	LeaksFixed         int64
	ImageEndOffset     int64
	TotalClusters      int64
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64
}

// HostMapper maps guest ranges straight onto a host file, so that
// convert -C can copy them with copy_file_range instead of through
// memory. A range it does not map must go through ReadAt/WriteAt.
type HostMapper interface {
	// HostMap returns the host file and offset holding the guest bytes
	// at off, and how many of the n bytes from there are contiguous in
	// it; ok is false when the range must go through the driver.
	HostMap(off, n int64) (f *File, hostOff, length int64, ok bool)
}

// CompressedWriter writes whole compressed clusters; convert -c uses it.
// Compress is safe for concurrent use so clusters compress on all cores;
// WriteCompressed stores what Compress produced.
type CompressedWriter interface {
	// CompressionUnit is the size of the clusters Compress takes.
	CompressionUnit() int64
	// Compress compresses one cluster of src into dst's storage. It
	// returns ok=false when compression does not make the cluster
	// smaller; the caller then writes src uncompressed.
	Compress(dst, src []byte) (out []byte, ok bool)
	// WriteCompressed stores a compressed cluster at guest offset off,
	// which is aligned to CompressionUnit.
	WriteCompressed(off int64, compressed []byte) error
}

// BackingChanger rewrites which backing file an image's header names,
// without opening it (qemu-img rebase).
type BackingChanger interface {
	// SetBacking stores name and format as the backing file and its
	// format; name "" removes both. Data written before reaches the disk
	// first, so that a crash never pairs the new reference with the old
	// data. Errors wrap syscall.EINVAL for a name or combination the
	// format cannot store and syscall.ENOSPC when the header has no room,
	// as QEMU's drivers return them.
	SetBacking(name, format string) error
}

// Emptier deallocates every cluster of an image so that it reads
// entirely as its backing file (QEMU's bdrv_make_empty), which commit
// does to the top image after copying it down.
type Emptier interface {
	MakeEmpty() error
}

// AllocatedSizer is implemented by images whose data spans several host
// files (VMDK extents): AllocatedSize is the host space all of them
// occupy, what qemu-img info calls "disk size"
// (bdrv_get_allocated_file_size).
type AllocatedSizer interface {
	AllocatedSize() (int64, error)
}

// CompressedOnly is implemented by images that take guest data only as
// whole compressed clusters through CompressedWriter (QEMU's
// needs_compressed_writes, a streamOptimized VMDK): convert writes
// them as with -c.
type CompressedOnly interface {
	NeedsCompressedWrites() bool
}

// Bitmapper manages an image's persistent dirty bitmaps (qemu-img
// bitmap, convert --bitmaps). Errors carry QEMU's messages, e.g.
// "Dirty bitmap 'x' not found".
type Bitmapper interface {
	// Bitmaps lists the persistent bitmaps in directory order.
	Bitmaps() ([]BitmapInfo, error)
	// AddBitmap creates an empty persistent bitmap; granularity 0 picks
	// the default (the cluster size, clamped to 4 KiB..64 KiB).
	AddBitmap(name string, granularity int64, disabled bool) error
	RemoveBitmap(name string) error
	ClearBitmap(name string) error
	EnableBitmap(name string) error
	DisableBitmap(name string) error
	// BitmapData returns a copy of a bitmap's bits.
	BitmapData(name string) (*DirtyBitmap, error)
	// MergeBitmap sets in bitmap dst every range that is dirty in src.
	MergeBitmap(dst string, src *DirtyBitmap) error
}

// BitmapInfo describes one persistent bitmap.
type BitmapInfo struct {
	Name        string
	Granularity int64
	Enabled     bool // the "auto" flag: writes are tracked
	InUse       bool // inconsistent: left in use by a program that did not close it
}

// DirtyBitmap is a bitmap's content: bit i (LSB first within each byte)
// covers guest bytes [i*Granularity, (i+1)*Granularity) of an image of
// Size bytes.
type DirtyBitmap struct {
	Granularity int64
	Size        int64
	Bits        []byte
}

// Snapshotter is implemented by images with internal snapshots (qcow2).
// Snapshot IDs are the decimal numbers the format assigns; names are
// chosen by the user and need not be unique.
type Snapshotter interface {
	// Snapshots lists the internal snapshots in table order.
	Snapshots() ([]Snapshot, error)
	// CreateSnapshot takes a snapshot of the current guest data. The ID
	// of s is ignored: the next free numeric ID is assigned. Name, dates,
	// VM clock, VM state size and icount are stored as given.
	CreateSnapshot(s Snapshot) error
	// ApplySnapshot reverts the guest data to the snapshot with ID
	// idOrName, or else with that name. A missing snapshot is an error
	// wrapping ErrSnapshotNotFound.
	ApplySnapshot(idOrName string) error
	// DeleteSnapshot removes the snapshot matching id and name; an empty
	// id or name matches any.
	DeleteSnapshot(id, name string) error
	// OpenSnapshot returns a read-only view of the guest data as of the
	// snapshot matching id and name (empty matches any), sharing the
	// open image: closing the view leaves the image open, and the view
	// must be closed before the image.
	OpenSnapshot(id, name string) (Image, error)
}

// QEMUNodeName stands for the automatic node name QEMU puts into some
// bitmap messages: "#block" and a counter that depends on QEMU's
// internals (126 for a plain qcow2 image opened by qemu-img bitmap).
const QEMUNodeName = "#block126"

// Amender changes the format options of an existing image in place
// (qemu-img amend). opts holds values for the driver's AmendOptions;
// force is --force. progress, when not nil, is told how much of the
// (projected) work is done, as QEMU's amend status callback.
type Amender interface {
	Amend(opts *Options, force bool, progress func(done, total int64)) error
}
