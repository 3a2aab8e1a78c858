package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// amendOptions are qcow2_amend_opts: the creation options amend can
// change, then the LUKS keyslot options.
var amendOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "compat", Type: formats.OptString, Help: "Compatibility level (v2 [0.10] or v3 [1.1])"},
	{Name: "backing_file", Type: formats.OptString, Help: "File name of a base image"},
	{Name: "backing_fmt", Type: formats.OptString, Help: "Image format of the base image"},
	{Name: "data_file", Type: formats.OptString, Help: "File name of an external data file"},
	{Name: "data_file_raw", Type: formats.OptBool, Help: "The external data file must stay valid as a raw image"},
	{Name: "lazy_refcounts", Type: formats.OptBool, Help: "Postpone refcount updates"},
	{Name: "refcount_bits", Type: formats.OptNumber, Help: "Width of a reference count entry in bits"},
	{Name: "encrypt.state", Type: formats.OptString, Help: "Select new state of affected keyslots (active/inactive)"},
	{Name: "encrypt.keyslot", Type: formats.OptNumber, Help: "Select a single keyslot to modify explicitly"},
	{Name: "encrypt.old-secret", Type: formats.OptString, Help: "Select all keyslots that match this password"},
	{Name: "encrypt.new-secret", Type: formats.OptString, Help: "New secret to set in the matching keyslots. Empty string to erase"},
	{Name: "encrypt.iter-time", Type: formats.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
}

func init() {
	Driver.AmendOptions = amendOptions
}

var _ formats.Amender = (*Image)(nil)

// amendPlan is what the options ask for, read as qcow2_amend_options
// reads them, with the image's current values where not given.
type amendPlan struct {
	version      uint32
	size         int64 // 0: unchanged
	backingFile  *string
	backingFmt   *string
	dataFile     *string
	dataFileRaw  bool
	lazy         bool
	refcountBits uint64
	// crypt is set when encrypt.* options change LUKS key slots.
	crypt *cryptAmend
}

func (img *Image) readAmendOptions(o *formats.Options) (*amendPlan, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	p := &amendPlan{
		version:      h.Version,
		dataFileRaw:  h.AutoclearFeatures&AutoclearDataFileRaw != 0,
		lazy:         h.CompatibleFeatures&CompatLazyRefcounts != 0,
		refcountBits: uint64(img.lay.RefcountBits),
	}
	bad := func(format string, args ...any) error {
		return errorf(formats.ErrInvalidOption, format, args...)
	}
	str := func(name string) *string {
		v := o.String(name)
		return &v
	}
	for _, spec := range amendOptions {
		if !o.Has(spec.Name) {
			continue
		}
		switch name := spec.Name; {
		case name == "size":
			n, _ := o.Uint(name)
			p.size = int64(n)
		case name == "compat":
			switch v := o.String(name); v {
			case "0.10", "v2":
				p.version = 2
			case "1.1", "v3":
				p.version = 3
			default:
				return nil, bad("Unknown compatibility level %s", v)
			}
		case name == "backing_file":
			p.backingFile = str(name)
		case name == "backing_fmt":
			p.backingFmt = str(name)
		case name == "lazy_refcounts":
			p.lazy = o.Bool(name)
		case name == "refcount_bits":
			n, _ := o.Uint(name)
			if n == 0 || n > 64 || n&(n-1) != 0 {
				return nil, bad("Refcount width must be a power of two and may not exceed 64 bits")
			}
			p.refcountBits = n
		case name == "data_file":
			p.dataFile = str(name)
			if *p.dataFile != "" && !img.lay.HasDataFile {
				return nil, bad("data-file can only be set for images that use an external data file")
			}
		case name == "data_file_raw":
			p.dataFileRaw = o.Bool(name)
			if p.dataFileRaw && h.AutoclearFeatures&AutoclearDataFileRaw == 0 {
				return nil, bad("data-file-raw cannot be set on existing images")
			}
		case strings.HasPrefix(name, "encrypt."):
			if err := img.checkCryptAmend(); err != nil {
				return nil, err
			}
			p.crypt = &cryptAmend{opts: o}
		}
	}
	return p, nil
}

// Amend is qcow2_amend_options: the steps run in QEMU's order, and a
// failing step leaves the earlier ones done, as in QEMU.
func (img *Image) Amend(o *formats.Options, force bool, progress func(done, total int64)) error {
	p, err := img.readAmendOptions(o)
	if err != nil {
		return err
	}
	if p.crypt != nil {
		p.crypt.force = force
	}
	img.mu.Lock()
	pr := &amendProgress{cb: progress}
	if p.version != img.hdr.Version {
		pr.total++
	}
	if p.crypt != nil {
		pr.total++
	}
	if p.refcountBits != uint64(img.lay.RefcountBits) {
		pr.total++
	}
	img.mu.Unlock()
	if err := img.amendHeader(p, pr); err != nil {
		return err
	}
	if p.size != 0 {
		if err := img.Resize(p.size, "off", true); err != nil {
			return err
		}
	}
	if p.version < 3 {
		img.mu.Lock()
		defer img.mu.Unlock()
		if img.hdr.Version > 2 {
			pr.current = opDowngrading
			return img.downgrade(pr)
		}
	}
	return nil
}

// amendHeader runs the steps before the resize: upgrade, refcount
// width, data file settings, backing file check, lazy refcounts.
func (img *Image) amendHeader(p *amendPlan, pr *amendProgress) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	h := img.hdr
	if p.version > h.Version {
		pr.current = opUpgrading
		if err := img.upgrade(pr.report); err != nil {
			return err
		}
	}
	if p.crypt != nil {
		// Key slots change after an upgrade and before the refcount
		// width, as in QEMU; the step reports no progress.
		pr.current = opUpdatingEncryption
		if err := img.amendEncryption(p.crypt); err != nil {
			return err
		}
	}
	if p.refcountBits != uint64(img.lay.RefcountBits) {
		if p.version < 3 && p.refcountBits != 16 {
			return errorf(formats.ErrInvalidOption, "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
		}
		pr.current = opRefcountOrder
		if err := img.changeRefcountOrder(uint32(bits.TrailingZeros64(p.refcountBits)), pr.report); err != nil {
			return err
		}
	}
	if h.Version >= 3 {
		if p.dataFileRaw {
			h.AutoclearFeatures |= AutoclearDataFileRaw
		} else {
			h.AutoclearFeatures &^= AutoclearDataFileRaw
		}
	}
	if p.dataFile != nil {
		h.DataFile = *p.dataFile
		h.HasDataFileExt = *p.dataFile != ""
	}
	if err := img.writeHeader(); err != nil {
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	if p.backingFile != nil || p.backingFmt != nil {
		if deref(p.backingFile) != h.BackingFile || deref(p.backingFmt) != h.BackingFormat {
			return errorf(formats.ErrInvalidOption, "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
		}
	}
	if p.lazy != (h.CompatibleFeatures&CompatLazyRefcounts != 0) {
		if p.lazy {
			if p.version < 3 {
				return errorf(formats.ErrInvalidOption, "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
			}
			h.CompatibleFeatures |= CompatLazyRefcounts
		} else {
			if err := img.markClean(); err != nil {
				return fmt.Errorf("Failed to make the image clean: %w", err)
			}
			h.CompatibleFeatures &^= CompatLazyRefcounts
		}
		if err := img.writeHeader(); err != nil {
			return fmt.Errorf("Failed to update the image header: %w", err)
		}
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// markClean is qcow2_mark_clean: the cached metadata reaches the disk,
// then the dirty bit is cleared. img.mu is held.
func (img *Image) markClean() error {
	if img.hdr.IncompatibleFeatures&IncompatDirty == 0 {
		return nil
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	return img.setDirtyBit(false)
}

// upgrade is qcow2_upgrade: snapshots without the extra data version 3
// requires get it (the snapshot table is rewritten), then the header
// becomes a version 3 one as QEMU writes it: 112 bytes with the
// compression type, and the feature name table. img.mu is held.
func (img *Image) upgrade(progress func(done, total int64)) error {
	progress(0, 2)
	for _, sn := range img.snapshots {
		if len(sn.Extra) < 16 {
			if err := img.writeSnapshotTable(img.snapshots, img.snapshotTableSize()); err != nil {
				return fmt.Errorf("Failed to update the snapshot table: %w", err)
			}
			break
		}
	}
	progress(1, 2)
	h := img.hdr
	old := *h
	h.Version = 3
	h.HeaderLength = headerV3Len
	h.RefcountOrder = img.lay.RefcountOrder
	if err := img.writeHeader(); err != nil {
		*h = old
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	img.lay = NewLayout(h)
	progress(2, 2)
	return nil
}

// downgrade is qcow2_downgrade to version 2: with QEMU's conditions, it
// makes the image clean, turns zero clusters into data clusters (or
// unallocated ones where no backing file shows through), and rewrites
// the header. img.mu is held.
func (img *Image) downgrade(pr *amendProgress) error {
	h := img.hdr
	if img.lay.RefcountOrder != 4 {
		return errorf(formats.ErrUnsupported, "compat=0.10 requires refcount_bits=16")
	}
	if img.lay.HasDataFile {
		return errorf(formats.ErrUnsupported, "Cannot downgrade an image with a data file")
	}
	for _, sn := range img.snapshots {
		if sn.VMStateSize > 0xffffffff || (sn.HasDiskSize && int64(sn.DiskSize) != img.size) {
			return errorf(formats.ErrUnsupported, "Internal snapshots prevent downgrade of image")
		}
	}
	if err := img.markClean(); err != nil {
		return fmt.Errorf("Failed to make the image clean: %w", err)
	}
	if f := h.IncompatibleFeatures &^ IncompatCompressionType; f != 0 {
		return errorf(formats.ErrUnsupported, "Cannot downgrade an image with incompatible features 0x%x set", f)
	}
	h.CompatibleFeatures = 0
	h.AutoclearFeatures = 0
	if err := img.expandZeroClusters(pr.report); err != nil {
		return fmt.Errorf("Failed to turn zero into data clusters: %w", err)
	}
	if h.CompressionType != CompressionZlib {
		has, err := img.hasCompressedClusters()
		if err != nil {
			return err
		}
		if has {
			return errorf(formats.ErrUnsupported, "Cannot downgrade an image with zstd compression type and existing compressed clusters")
		}
		h.IncompatibleFeatures &^= IncompatCompressionType
		h.CompressionType = CompressionZlib
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	old := *h
	h.Version = 2
	h.HeaderLength = headerV2Len
	if err := img.writeHeader(); err != nil {
		*h = old
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	img.lay = NewLayout(h)
	return nil
}

var errZeroInSnapshot = errors.New("zero clusters shared with internal snapshots cannot be expanded by imgfs")

// expandZeroClusters is qcow2_expand_zero_clusters for the active L1
// table: a zero cluster with storage gets its storage zeroed and loses
// the zero flag; one without becomes unallocated, or, when a backing
// file would show through, gets a new cluster of zeroes. The zeroes
// reach the disk before the L2 entries that expose them. Zero clusters
// in tables of internal snapshots are refused (errZeroInSnapshot)
// rather than expanded. Progress counts L1 entries, the snapshots'
// included, as QEMU's. img.mu is held.
func (img *Image) expandZeroClusters(progress func(done, total int64)) error {
	total := int64(len(img.l1))
	for _, sn := range img.snapshots {
		total += int64(sn.L1Size)
	}
	if err := img.checkSnapshotZeroes(); err != nil {
		return err
	}
	lay := &img.lay
	cs := lay.ClusterSize
	zeroes := make([]byte, cs)
	visited := int64(0)
	for i := range img.l1 {
		off := img.l1[i] & OffsetMask
		if off != 0 {
			if err := img.expandZeroesIn(i, off, zeroes); err != nil {
				return err
			}
		}
		visited++
		progress(visited, total)
	}
	for _, sn := range img.snapshots {
		for range sn.L1Size {
			visited++
			progress(visited, total)
		}
	}
	return nil
}

// expandZeroesIn expands the zero clusters of the L2 table at off, which
// L1 entry i points to. img.mu is held.
func (img *Image) expandZeroesIn(i int, off uint64, zeroes []byte) error {
	lay := &img.lay
	cs := lay.ClusterSize
	t, err := img.l2Table(off)
	if err != nil {
		return err
	}
	for j := int64(0); j < lay.L2Entries; j++ {
		e := lay.ReadL2Entry(t.data, j)
		typ := lay.ClusterType(e)
		if typ != ZeroPlain && typ != ZeroAlloc {
			continue
		}
		if img.l1[i]&OflagCopied == 0 || (typ == ZeroAlloc && !e.Copied()) {
			return errZeroInSnapshot
		}
		var host uint64
		switch {
		case typ == ZeroAlloc:
			host = e.HostOffset()
		case img.backing == nil:
			lay.WriteL2Entry(t.data, j, L2Entry{})
			t.dirty = true
			continue
		default:
			if host, err = img.allocClusters(1); err != nil {
				return err
			}
			if err := img.l2DependsOnRefcounts(); err != nil {
				return err
			}
		}
		if err := img.checkOverlap(host, uint64(cs)); err != nil {
			return err
		}
		if _, err := img.file.WriteAt(zeroes, int64(host)); err != nil {
			return err
		}
		if err := img.file.Sync(); err != nil {
			return err
		}
		// The cache may have written the table back meanwhile.
		if t, err = img.l2Table(off); err != nil {
			return err
		}
		lay.WriteL2Entry(t.data, j, L2Entry{Raw: host | OflagCopied})
		t.dirty = true
	}
	return nil
}

// checkSnapshotZeroes refuses (errZeroInSnapshot) when an L2 table of
// an internal snapshot that the active L1 table does not use has zero
// clusters. img.mu is held.
func (img *Image) checkSnapshotZeroes() error {
	active := map[uint64]bool{}
	for _, e := range img.l1 {
		active[e&OffsetMask] = true
	}
	for _, sn := range img.snapshots {
		l1, err := readTable(img.file, sn.L1TableOffset, int64(sn.L1Size))
		if err != nil {
			return err
		}
		for _, e := range l1 {
			off := e & OffsetMask
			if off == 0 || active[off] {
				continue
			}
			t, err := img.l2Table(off)
			if err != nil {
				return err
			}
			for j := int64(0); j < img.lay.L2Entries; j++ {
				if typ := img.lay.ClusterType(img.lay.ReadL2Entry(t.data, j)); typ == ZeroPlain || typ == ZeroAlloc {
					return errZeroInSnapshot
				}
			}
		}
	}
	return nil
}

// Amend operations, for the progress projection.
const (
	opNone = iota
	opUpgrading
	opRefcountOrder
	opUpdatingEncryption
	opDowngrading
)

// amendProgress is qcow2_amend_helper_cb: it turns the progress of the
// current operation into progress of the whole amend, projecting the
// work of the operations still to come from those done. An upgrade
// counts as an operation but reports nothing, as in QEMU.
type amendProgress struct {
	cb                   func(done, total int64)
	total, completed     int64
	current, last        int
	offsetDone, lastWork int64
}

func (p *amendProgress) report(off, work int64) {
	if p.cb == nil {
		return
	}
	if p.current != p.last {
		if p.last != opNone {
			p.offsetDone += p.lastWork
			p.completed++
		}
		p.last = p.current
	}
	p.lastWork = work
	cur := p.offsetDone + work
	projected := cur * (p.total - p.completed - 1) / (p.completed + 1)
	p.cb(p.offsetDone+off, cur+projected)
}

// hasCompressedClusters is qcow2_has_compressed_clusters for the active
// L1 table. img.mu is held.
func (img *Image) hasCompressedClusters() (bool, error) {
	for i := range img.l1 {
		off := img.l1[i] & OffsetMask
		if off == 0 {
			continue
		}
		t, err := img.l2Table(off)
		if err != nil {
			return false, err
		}
		for j := int64(0); j < img.lay.L2Entries; j++ {
			if img.lay.ClusterType(img.lay.ReadL2Entry(t.data, j)) == Compressed {
				return true, nil
			}
		}
	}
	return false, nil
}
