package vmdk

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

type extentKind int

const (
	kindFlat     extentKind = iota // FLAT / VMFS: guest bytes at an offset of a file
	kindSparse                     // KDMV or COWD grain directory and tables
	kindSESparse                   // ESXi seSparse, 64-bit tables, read-only
)

// extent is one extent of an image (QEMU's VmdkExtent).
type extent struct {
	f    *formats.File
	own  bool // f was opened for this extent (not the image file)
	kind extentKind
	typ  string // descriptor type ("SPARSE", "FLAT", ...), "" for the image file itself

	start   int64 // guest byte offset of the extent
	sectors int64

	flatOffset int64 // FLAT/VMFS: byte offset in f

	// Sparse extents.
	compressed, marker, zeroGrain, gdAtEnd bool
	version                                uint32
	grainSectors                           int64 // whole extent for flat ones
	gtEntries                              uint32
	entrySize                              int // 4, or 8 for seSparse
	l1Offset, l1BackupOffset               int64
	l1Size                                 uint32
	l1EntrySectors                         int64
	l1                                     []uint64
	l1Backup                               []uint64
	seTablesOffset, seGrainsOffset         uint64 // sectors

	// nextSector is where the next grain is allocated; guarded by
	// Image.mu, as is cache.
	nextSector int64
	cache      *tableCache
}

func (e *extent) grainBytes() int64 { return e.grainSectors * sectorSize }

// readTable reads n entries of size bytes at off. Entries past the end of
// the file read as zero (as QEMU's reads past EOF do), and are not
// allocated, so a hostile size cannot make us allocate more than the
// file holds.
func readTable(f *formats.File, off, n int64, size int, fileSize int64) ([]uint64, error) {
	if off < 0 {
		return nil, fmt.Errorf("table offset %d: %w", off, formats.ErrCorrupt)
	}
	avail := max(0, (fileSize-off)/int64(size))
	stored := min(n, avail)
	buf := make([]byte, stored*int64(size))
	if _, err := f.ReadAt(buf, off); err != nil {
		return nil, err
	}
	out := make([]uint64, stored)
	for i := range out {
		if size == 8 {
			out[i] = binary.LittleEndian.Uint64(buf[8*i:])
		} else {
			out[i] = uint64(binary.LittleEndian.Uint32(buf[4*i:]))
		}
	}
	return out, nil
}

// tableEntry returns entry i of a table that may be shorter than its
// nominal size (the rest reads as zero).
func tableEntry(t []uint64, i int64) uint64 {
	if i < int64(len(t)) {
		return t[i]
	}
	return 0
}

// tableCache keeps recently used grain tables of one extent, keyed by
// their sector offset. It is not safe for concurrent use: Image.mu
// guards it.
type tableCache struct {
	max    int
	tables map[uint64]*cachedTable
	clock  uint64
}

type cachedTable struct {
	entries []uint64
	used    uint64
}

// cacheBytes bounds the memory grain tables of one extent may hold.
const cacheBytes = 4 << 20

func newTableCache(tableBytes int) *tableCache {
	return &tableCache{max: max(16, cacheBytes/max(tableBytes, 1)), tables: map[uint64]*cachedTable{}}
}

// get returns the grain table at sector gtSector, reading it on a miss.
func (e *extent) table(gtSector uint64) ([]uint64, error) {
	c := e.cache
	c.clock++
	if t, ok := c.tables[gtSector]; ok {
		t.used = c.clock
		return t.entries, nil
	}
	if len(c.tables) >= c.max {
		var victim uint64
		oldest := ^uint64(0)
		for k, t := range c.tables {
			if t.used < oldest {
				victim, oldest = k, t.used
			}
		}
		delete(c.tables, victim)
	}
	size, err := e.f.Size()
	if err != nil {
		return nil, err
	}
	entries, err := readTable(e.f, int64(gtSector)*sectorSize, int64(e.gtEntries), e.entrySize, size)
	if err != nil {
		return nil, fmt.Errorf("%s: reading grain table at sector %d: %w", e.f.Name(), gtSector, err)
	}
	// A table cut short by the end of the file reads as zeroes; keep it
	// full length so that updates can be cached.
	full := make([]uint64, e.gtEntries)
	copy(full, entries)
	c.tables[gtSector] = &cachedTable{entries: full, used: c.clock}
	return full, nil
}

// grainState is get_cluster_offset's answer.
type grainState int

const (
	grainUnalloc grainState = iota // not in this layer
	grainZero                      // reads as zeroes (zeroed grain)
	grainData                      // stored at the returned host offset
)

// where locates a grain: l1 and l2 index and the grain table's sector.
type where struct {
	l1i      int64
	gtSector uint64
	l2i      int64
}

// lookup is get_cluster_offset without allocation: the state of the
// grain holding extent-relative byte off, its host byte offset, and
// where its table entry is (gtSector 0 when its table is missing). The
// caller holds Image.mu.
func (e *extent) lookup(off int64) (grainState, int64, where, error) {
	if e.kind == kindFlat {
		return grainData, e.flatOffset, where{}, nil
	}
	sector := off >> 9
	w := where{l1i: sector / e.l1EntrySectors}
	if w.l1i >= int64(e.l1Size) {
		return 0, 0, w, e.errLookup(off, "grain directory index %d beyond %d entries", w.l1i, e.l1Size)
	}
	l1 := tableEntry(e.l1, w.l1i)
	if e.kind == kindSESparse {
		switch {
		case l1 == 0:
		case l1&0xffffffff00000000 != 0x1000000000000000:
			return 0, 0, w, e.errLookup(off, "bad grain directory entry %#x", l1)
		default:
			t := e.seTablesOffset + (l1&0xffffffff)*uint64(e.gtEntries)*8/sectorSize
			if t > 0xffffffff {
				return 0, 0, w, e.errLookup(off, "grain table at sector %#x out of range", t)
			}
			l1 = t
		}
	}
	if l1 == 0 {
		return grainUnalloc, 0, w, nil
	}
	w.gtSector = l1
	t, err := e.table(l1)
	if err != nil {
		return 0, 0, w, err
	}
	w.l2i = sector / e.grainSectors % int64(e.gtEntries)
	v := t[w.l2i]
	if e.kind == kindSESparse {
		switch v & 0xf000000000000000 {
		case 0:
			if v != 0 {
				return 0, 0, w, e.errLookup(off, "bad grain table entry %#x", v)
			}
			return grainUnalloc, 0, w, nil
		case 0x1000000000000000, 0x2000000000000000: // unmapped or zero
			return grainZero, 0, w, nil
		case 0x3000000000000000:
			g := (v&0x0fff000000000000)>>48 | (v&0x0000ffffffffffff)<<12
			s := e.seGrainsOffset + g*uint64(e.grainSectors)
			if s > 1<<54 {
				return 0, 0, w, e.errLookup(off, "grain at sector %#x out of range", s)
			}
			return grainData, int64(s) * sectorSize, w, nil
		}
		return 0, 0, w, e.errLookup(off, "bad grain table entry %#x", v)
	}
	switch {
	case e.zeroGrain && v == gteZeroed:
		return grainZero, 0, w, nil
	case v == 0:
		return grainUnalloc, 0, w, nil
	}
	return grainData, int64(v) * sectorSize, w, nil
}

func (e *extent) errLookup(off int64, format string, args ...any) error {
	return fmt.Errorf("%s: extent offset %d: %s: %w", e.f.Name(), off, fmt.Sprintf(format, args...), formats.ErrCorrupt)
}

// setEntry writes grain table entry v at w, in the table and in its
// redundant copy (vmdk_L2update). The caller holds Image.mu.
func (e *extent) setEntry(w where, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	off := int64(w.gtSector)*sectorSize + w.l2i*4
	if _, err := e.f.WriteAt(b[:], off); err != nil {
		return err
	}
	if e.l1BackupOffset != 0 {
		if bt := tableEntry(e.l1Backup, w.l1i); bt != 0 {
			if _, err := e.f.WriteAt(b[:], int64(bt)*sectorSize+w.l2i*4); err != nil {
				return err
			}
			// The redundant table may be cached too.
			if t, ok := e.cache.tables[bt]; ok {
				t.entries[w.l2i] = uint64(v)
			}
		}
	}
	if t, ok := e.cache.tables[w.gtSector]; ok {
		t.entries[w.l2i] = uint64(v)
	}
	return nil
}

// allocate reserves the next grain of the extent and returns its sector
// (the caller holds Image.mu).
func (e *extent) allocate() (int64, error) {
	if e.nextSector >= maxExtentSectors {
		return 0, fmt.Errorf("%s: extent is full (grain at sector %d): %w", e.f.Name(), e.nextSector, errInval)
	}
	s := e.nextSector
	e.nextSector += e.grainSectors
	return s, nil
}
