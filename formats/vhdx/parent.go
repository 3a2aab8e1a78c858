package vhdx

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unicode/utf16"

	"github.com/imgfs/imgfs/formats"
)

// Differencing images (MS-VHDX 2.6.2.6 and 2.5.1). QEMU 7.2 refuses to
// open them; imgfs reads and writes them: blocks that are not present
// read from the parent, partially present blocks read sector by sector
// as their sector bitmap says, and a write to a block without all its
// data first copies the block's current content into a new block, so
// that written blocks are always fully present and the sector bitmaps
// never change.

// parentVHDXGUID is the locator type of a VHDX parent.
var parentVHDXGUID = makeGUID(0xb04aefb7, 0xd19e, 0x4a81, [8]byte{0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13})

// maxLocatorLen bounds the parent locator item read into memory.
const maxLocatorLen = 64 * kiB

// parseLocator returns the key/value pairs of a parent locator item.
func parseLocator(b []byte) (map[string]string, bool) {
	le := binary.LittleEndian
	if len(b) < 20 || guid(b[0:16]) != parentVHDXGUID {
		return nil, false
	}
	n := int(le.Uint16(b[18:]))
	if n > (len(b)-20)/12 {
		return nil, false
	}
	str := func(off uint32, length uint16) (string, bool) {
		if length%2 != 0 || uint64(off)+uint64(length) > uint64(len(b)) {
			return "", false
		}
		u := make([]uint16, length/2)
		for i := range u {
			u[i] = le.Uint16(b[int(off)+2*i:])
		}
		return string(utf16.Decode(u)), true
	}
	kv := map[string]string{}
	for i := range n {
		e := b[20+12*i:]
		k, ok1 := str(le.Uint32(e[0:]), le.Uint16(e[8:]))
		v, ok2 := str(le.Uint32(e[4:]), le.Uint16(e[10:]))
		if !ok1 || !ok2 {
			return nil, false
		}
		kv[k] = v
	}
	return kv, true
}

// parentName picks the parent's path from a locator: the relative path,
// else the absolute Win32 path, with Windows separators made Unix ones.
func parentName(kv map[string]string) string {
	p := kv["relative_path"]
	if p == "" {
		p = kv["absolute_win32_path"]
	}
	p = strings.ReplaceAll(p, `\`, "/")
	return strings.TrimPrefix(p, "./")
}

// Backing returns the open parent image, or nil.
func (img *Image) Backing() formats.Image { return img.parent }

// BackingInfo returns the parent's path from the locator ("" without).
func (img *Image) BackingInfo() (name, format string) {
	if img.parentPath == "" {
		return "", ""
	}
	return img.parentPath, "vhdx"
}

// sectorRuns calls fn for each run of sectors of [pos, pos+n) (inside
// one partially present block) with the same sector bitmap bit.
func (img *Image) sectorRuns(pos, n int64, fn func(pos, n int64, present bool) error) error {
	block := pos / img.blockSize
	img.mu.Lock()
	e := img.bat[(block/img.chunkRatio)*(img.chunkRatio+1)+img.chunkRatio]
	img.mu.Unlock()
	if e&batStateMask != blockFullyPresent {
		return fmt.Errorf("%s: partially present block %d without a sector bitmap: %w", img.f.Name(), block, errIO)
	}
	sectorsPerBlock := img.blockSize / img.logicalSector
	first := (block%img.chunkRatio)*sectorsPerBlock + pos%img.blockSize/img.logicalSector
	last := (block%img.chunkRatio)*sectorsPerBlock + (pos%img.blockSize+n-1)/img.logicalSector
	bits := make([]byte, last/8-first/8+1)
	if _, err := img.f.ReadAt(bits, int64(e&batOffsetMask)+first/8); err != nil {
		return err
	}
	bit := func(s int64) bool { return bits[s/8-first/8]>>(s%8)&1 != 0 }
	blockStart := pos - pos%img.blockSize
	blockFirst := (block % img.chunkRatio) * sectorsPerBlock // bit of the block's sector 0
	for s := first; s <= last; {
		present := bit(s)
		t := s + 1
		for t <= last && bit(t) == present {
			t++
		}
		lo := max(pos, blockStart+(s-blockFirst)*img.logicalSector)
		hi := min(pos+n, blockStart+(t-blockFirst)*img.logicalSector)
		if err := fn(lo, hi-lo, present); err != nil {
			return err
		}
		s = t
	}
	return nil
}
