package vhdx

import (
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unicode/utf16"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// locatorItem encodes a VHDX parent locator with the given pairs.
func locatorItem(kv [][2]string) []byte {
	le := binary.LittleEndian
	b := make([]byte, 20+12*len(kv))
	copy(b, parentVHDXGUID[:])
	le.PutUint16(b[18:], uint16(len(kv)))
	for i, p := range kv {
		var enc [2][]byte
		for j, s := range p {
			for _, u := range utf16.Encode([]rune(s)) {
				enc[j] = le.AppendUint16(enc[j], u)
			}
		}
		e := b[20+12*i:]
		le.PutUint32(e[0:], uint32(len(b)))
		le.PutUint16(e[8:], uint16(len(enc[0])))
		b = append(b, enc[0]...)
		le.PutUint32(e[4:], uint32(len(b)))
		le.PutUint16(e[10:], uint16(len(enc[1])))
		b = append(b, enc[1]...)
	}
	return b
}

// TestDifferencing builds a differencing image by hand (neither QEMU nor
// imgfs creates them) with a block in each state, and checks reads,
// block status through the chain, and writes.
func TestDifferencing(t *testing.T) {
	const size, bs = 8 << 20, 1 << 20
	dir := t.TempDir()
	parentName, child := filepath.Join(dir, "parent.vhdx"), filepath.Join(dir, "child.vhdx")
	rng := rand.New(rand.NewPCG(8, 8))
	a, b, c := fillRandom(rng, size), fillRandom(rng, bs), fillRandom(rng, bs)
	if err := formatstest.Create(t, "vhdx", parentName, "size=8M,block_size=1M"); err != nil {
		t.Fatal(err)
	}
	p := formatstest.Open(t, parentName, formats.OpenOptions{Format: "vhdx"})
	if _, err := p.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	p.Close()

	if err := formatstest.Create(t, "vhdx", child, "size=8M,block_size=1M,block_state_zero=off"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(child, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	const metaOff, batOff, end = 3 * miB, 2 * miB, 8 * miB
	put := func(off int64, data []byte) {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	put(metaOff+headerBlockSize+4, le.AppendUint32(nil, paramHasParent))
	loc := locatorItem([][2]string{{"parent_linkage", "{00000000-0000-0000-0000-000000000000}"}, {"relative_path", `.\parent.vhdx`}})
	entry := make([]byte, metadataEntryLen)
	(&metadataEntry{ItemID: parentLocatorGUID, Offset: headerBlockSize + 40, Length: uint32(len(loc)), Flags: metaIsRequired}).encode(entry)
	put(metaOff+32+5*metadataEntryLen, entry)
	put(metaOff+10, le.AppendUint16(nil, 6))
	put(metaOff+headerBlockSize+40, loc)
	// Block 1 fully present at 8 MiB, block 2 zero, block 3 partially
	// present at 9 MiB with sectors 0-7 and 100-299 its own, the sector
	// bitmap at 10 MiB (BAT entry 4096, after the chunk's 4096 blocks).
	put(batOff+8*1, le.AppendUint64(nil, end|blockFullyPresent))
	put(batOff+8*2, le.AppendUint64(nil, blockZero))
	put(batOff+8*3, le.AppendUint64(nil, (end+miB)|blockPartiallyPresent))
	put(batOff+8*4096, le.AppendUint64(nil, (end+2*miB)|blockFullyPresent))
	put(end, b)
	put(end+miB, c)
	bitmap := make([]byte, miB)
	own := func(s int) bool { return s < 8 || s >= 100 && s < 300 }
	for s := range 2048 {
		if own(s) {
			bitmap[(3*2048+s)/8] |= 1 << ((3*2048 + s) % 8)
		}
	}
	put(end+2*miB, bitmap)
	f.Close()

	want := append([]byte(nil), a...)
	copy(want[bs:], b)
	clear(want[2*bs : 3*bs])
	for s := range 2048 {
		if own(s) {
			copy(want[3*bs+512*s:3*bs+512*(s+1)], c[512*s:])
		}
	}
	img := formatstest.Open(t, child, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
	if name, format := img.(formats.Backed).BackingInfo(); name != "parent.vhdx" || format != "vhdx" {
		t.Errorf("BackingInfo = %q, %q", name, format)
	}
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, img), want); i >= 0 {
		t.Fatalf("byte %d differs", i)
	}
	for _, tc := range []struct {
		off, length int64
		depth       int
		status      formats.Status
	}{
		{0, bs, 1, formats.StatusData},
		{bs, bs, 0, formats.StatusData | formats.StatusOffsetValid},
		{2 * bs, bs, 0, formats.StatusZero},
		{3 * bs, 8 * 512, 0, formats.StatusData | formats.StatusOffsetValid},
		{3*bs + 8*512, 92 * 512, 1, formats.StatusData},
		{3*bs + 100*512, 200 * 512, 0, formats.StatusData | formats.StatusOffsetValid},
		{3*bs + 300*512, bs - 300*512, 1, formats.StatusData},
	} {
		e, err := formats.ChainStatus(img, tc.off, tc.length)
		if err != nil {
			t.Fatal(err)
		}
		if e.Length != tc.length || e.Depth != tc.depth || e.Status&^formats.StatusOffsetValid != tc.status&^formats.StatusOffsetValid ||
			tc.depth == 0 && e.Status != tc.status {
			t.Errorf("ChainStatus(%d, %d) = %+v, want depth %d status %#x", tc.off, tc.length, e, tc.depth, tc.status)
		}
	}
	img.Close()

	// Writes keep what the blocks read so far around the new bytes.
	img = formatstest.Open(t, child, formats.OpenOptions{Format: "vhdx"})
	x := fillRandom(rng, bs)
	for _, w := range []struct{ off, n int64 }{{3*bs + 4000, 70000}, {bs - 100, 200}, {5*bs + 3, 10}} {
		if _, err := img.WriteAt(x[:w.n], w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], x[:w.n])
	}
	if err := img.(formats.Zeroer).WriteZeroes(6*bs+512, 4096, true); err != nil {
		t.Fatal(err)
	}
	clear(want[6*bs+512 : 6*bs+512+4096])
	img.Close()
	img = formatstest.Open(t, child, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
	defer img.Close()
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, img), want); i >= 0 {
		t.Fatalf("after writes byte %d differs", i)
	}
	p = formatstest.Open(t, parentName, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
	defer p.Close()
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, p), a); i >= 0 {
		t.Fatalf("the parent changed at %d", i)
	}
}
