package qcow2

import (
	"math/bits"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
)

func init() { Driver.Measure = measure }

// Sizes of the structures measure counts (docs/interop/qcow2.txt).
const (
	l1EntrySize          = 8
	l2EntrySize          = 8
	l2EntrySizeExtended  = 16
	reftableEntrySize    = 8
	bitmapTableEntrySize = 8
	defaultRefcountBits  = 16
)

// measure is qcow2_measure: the size of a new qcow2 file for the
// options in o, holding src's content when src is not nil. Options are
// checked with measure's own messages, which differ from create's.
func measure(o *formats.Options, src formats.Image) (*formats.MeasureResult, error) {
	bad := func(format string, args ...any) error {
		return errorf(formats.ErrInvalidOption, format, args...)
	}
	extL2 := o.Bool("extended_l2")
	cs, _ := o.Uint("cluster_size")
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return nil, bad("Cluster size must be a power of two between %d and %dk", 1<<minClusterBits, 1<<maxClusterBits>>10)
	}
	if extL2 && cs < 1<<minClusterBitsExtL2 {
		return nil, bad("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 1<<minClusterBitsExtL2)
	}
	version := 3
	switch v := o.String("compat"); v {
	// Unlike create, measure knows only the numeric names.
	case "", "1.1":
	case "0.10":
		version = 2
	default:
		return nil, bad("Invalid compatibility level: '%s'", v)
	}
	rb, _ := o.Uint("refcount_bits")
	if rb > 64 || rb == 0 || rb&(rb-1) != 0 {
		return nil, bad("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if version < 3 && rb != defaultRefcountBits {
		return nil, bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	}
	prealloc := o.String("preallocation")
	switch prealloc {
	case "", "off", "metadata", "falloc", "full":
	default:
		return nil, bad("invalid parameter value: %s", prealloc)
	}
	// A LUKS header region takes whole clusters before any data.
	var luksRegion uint64
	if o.String("encrypt.format") == "luks" {
		cp, err := luks.ParseCreateOptions(o, "encrypt.")
		if err != nil {
			return nil, err
		}
		region, err := luks.RegionSize(cp.Spec)
		if err != nil {
			return nil, err
		}
		luksRegion = roundUpU(uint64(region), cs)
	}

	// Like QEMU, the arithmetic is unsigned and wraps for absurd sizes.
	size, _ := o.Uint("size")
	virtual := roundUpU(size, cs)
	l2e := uint64(l2EntrySize)
	if extL2 {
		l2e = l2EntrySizeExtended
	}
	if divRoundUp(virtual/cs, cs/l2e)*l1EntrySize > maxL1Bytes {
		return nil, bad("The image size is too large (try using a larger cluster size)")
	}

	var required uint64
	if src != nil {
		ssize := src.Size()
		virtual = roundUpU(uint64(ssize), cs)
		if o.Has("backing_file") {
			// The new image's backing file may share nothing with src:
			// every cluster may need writing.
			required = virtual
		} else {
			n, err := allocatedBytes(src, int64(cs))
			if err != nil {
				return nil, err
			}
			required = n
		}
	}
	if prealloc == "full" || prealloc == "falloc" {
		required = virtual
	}
	full := preallocSize(virtual, cs, uint(bits.TrailingZeros64(rb)), extL2) + luksRegion
	res := &formats.MeasureResult{
		FullyAllocated: int64(full),
		// The metadata of a fully allocated image is still counted.
		Required: int64(full - virtual + required),
	}
	if img, ok := src.(*Image); ok && version >= 3 {
		res.HasBitmaps, res.Bitmaps = img.persistentBitmapsSize(cs)
	}
	return res, nil
}

// allocatedBytes counts the clusters of size cs that src's data (not
// zeroes, not unallocated ranges) touches, walking the whole backing
// chain as qcow2_measure walks bdrv_block_status_above.
func allocatedBytes(src formats.Image, cs int64) (uint64, error) {
	var required uint64
	size := src.Size()
	for off := int64(0); off < size; {
		e, err := formats.ChainStatus(src, off, size-off)
		if err != nil {
			return 0, errorf(formats.ErrCorrupt, "Unable to get block status: %v", err)
		}
		n := e.Length
		if n <= 0 {
			return 0, errorf(formats.ErrCorrupt, "Unable to get block status: no progress at offset %d", off)
		}
		if e.Status&formats.StatusZero == 0 && e.Present && e.Status&formats.StatusData != 0 {
			// Count up to the end of the cluster; the next step starts
			// there.
			n = (off+n+cs-1)/cs*cs - off
			required += uint64(off%cs + n)
		}
		off += n
	}
	return required, nil
}

// persistentBitmapsSize is qcow2_get_persistent_dirty_bitmap_size for a
// target with clusters of cs bytes: every bitmap of img fully allocated,
// its bitmap table, and the bitmap directory. ok is false when img
// cannot hold persistent bitmaps (version 2).
func (img *Image) persistentBitmapsSize(cs uint64) (ok bool, size int64) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hdr.Version < 3 {
		return false, 0
	}
	var total, dir uint64
	for _, b := range img.bitmaps {
		granularity := uint64(1) << b.GranularityBits
		bytes := divRoundUp(divRoundUp(uint64(img.size), granularity), 8)
		clusters := divRoundUp(bytes, cs)
		total += clusters * cs
		total += roundUpU(clusters*bitmapTableEntrySize, cs)
		// The new image's entries carry no extra data.
		dir += roundUpU(bitmapEntryLen+uint64(len(b.Name)), 8)
	}
	return true, int64(total + roundUpU(dir, cs))
}

// preallocSize is qcow2_calc_prealloc_size: the file size of an image
// of total bytes with every cluster allocated, metadata included.
func preallocSize(total, cs uint64, refcountOrder uint, extL2 bool) uint64 {
	l2e := uint64(l2EntrySize)
	if extL2 {
		l2e = l2EntrySizeExtended
	}
	aligned := roundUpU(total, cs)
	meta := cs // the header
	nl2e := roundUpU(aligned/cs, cs/l2e)
	meta += nl2e * l2e
	nl1e := roundUpU(nl2e*l2e/cs, cs/l1EntrySize)
	meta += nl1e * l1EntrySize
	meta += refcountMetadataSize((meta+aligned)/cs, cs, refcountOrder)
	return meta + aligned
}

// refcountMetadataSize is qcow2_refcount_metadata_size without the
// generous increase: the refcount table and blocks needed to count
// clusters clusters plus themselves, found by iterating to a fixed point.
func refcountMetadataSize(clusters, cs uint64, refcountOrder uint) uint64 {
	perTableCluster := cs / reftableEntrySize
	perBlock := cs * 8 >> refcountOrder
	var table, blocks, n uint64
	for {
		last := n
		blocks = divRoundUp(clusters+table+blocks, perBlock)
		table = divRoundUp(blocks, perTableCluster)
		n = clusters + blocks + table
		if n == last {
			return (blocks + table) * cs
		}
	}
}

func roundUpU(n, unit uint64) uint64   { return (n + unit - 1) / unit * unit }
func divRoundUp(n, unit uint64) uint64 { return (n + unit - 1) / unit }
