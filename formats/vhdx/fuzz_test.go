package vhdx

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// structEnd is where the structures of a small image made with
// log_size=1M end: the metadata items at 3 MiB + 64 KiB. Seeds are cut
// there (the rest is payload) to keep the fuzzer's inputs small.
const structEnd = 3*miB + headerBlockSize + 40

// fuzzSeeds makes small images, with our driver and with qemu-img and
// qemu-io, cut after their structures.
func fuzzSeeds(f *testing.F) [][]byte {
	dir := f.TempDir()
	var seeds [][]byte
	add := func(name string) {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b[:min(len(b), structEnd)])
	}
	for i, opts := range []string{"size=1M,block_size=1M", "size=3M,block_size=1M,subformat=fixed", "size=1M,block_size=1M,block_state_zero=off"} {
		name := filepath.Join(dir, "ours"+string(rune('0'+i)))
		if err := formatstest.Create(f, "vhdx", name, opts); err != nil {
			f.Fatal(err)
		}
		add(name)
	}
	formatstest.RequireQemu(f)
	name := filepath.Join(dir, "qemu.vhdx")
	formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", name, "1M")
	formatstest.QemuIO(f, "vhdx", name, "write -P 1 0 4k")
	add(name)
	return seeds
}

// FuzzOpen opens arbitrary bytes as an image read-only, reads a few
// ranges and checks it: nothing may panic, hang or allocate beyond the
// hostile-image limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Add([]byte("vhdxfile"))
	f.Fuzz(func(t *testing.T, data []byte) {
		name := filepath.Join(t.TempDir(), "f.vhdx")
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		size := img.Size()
		buf := make([]byte, 4096)
		for _, off := range []int64{0, 512, size / 2, size - 1} {
			if off >= 0 && off < size {
				img.ReadAt(buf, off)
			}
		}
		img.(*Image).Check(t.Context(), formats.CheckReadOnly, func(string) {})
	})
}

// FuzzLog puts arbitrary bytes into the log of a valid image and names
// the log GUID found where an entry header keeps it in the current
// header, so that the log search and validation run on them.
func FuzzLog(f *testing.F) {
	base := filepath.Join(f.TempDir(), "base.vhdx")
	if err := formatstest.Create(f, "vhdx", base, "size=1M,block_size=1M"); err != nil {
		f.Fatal(err)
	}
	template, err := os.ReadFile(base)
	if err != nil {
		f.Fatal(err)
	}
	// A seed holding a real entry: one of our BAT updates, captured
	// before the log is emptied.
	img := formatstest.Open(f, base, formats.OpenOptions{Format: "vhdx"}).(*Image)
	img.mu.Lock()
	err = img.writeLogEntry([]logWrite{{offset: uint64(img.batOffset), data: make([]byte, logSectorSize)}})
	img.mu.Unlock()
	img.f.Close()
	if err != nil {
		f.Fatal(err)
	}
	written, err := os.ReadFile(base)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(written[headerSectionEnd : headerSectionEnd+2*logSectorSize])
	f.Add([]byte("loge"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > miB {
			return
		}
		b := append([]byte(nil), template...)
		copy(b[headerSectionEnd:], data)
		if len(data) >= 48 {
			for _, off := range []int{header1Offset, header2Offset} {
				h := decodeHeader(b[off:])
				copy(h.LogGUID[:], data[32:48])
				h.encode(b[off : off+headerCRCSize])
			}
		}
		name := filepath.Join(t.TempDir(), "f.vhdx")
		if err := os.WriteFile(name, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if img, err := formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: true, NoBacking: true}); err == nil {
			img.Close()
		}
	})
}

// TestDecodeRoundTrip checks each on-disk structure's encode/decode pair.
func TestDecodeRoundTrip(t *testing.T) {
	h := header{Sequence: 7, FileWriteGUID: newGUID(), DataWriteGUID: newGUID(), LogGUID: newGUID(),
		Version: 1, LogLength: miB, LogOffset: miB}
	buf := make([]byte, headerCRCSize)
	h.encode(buf)
	if got := decodeHeader(buf); got != h || !headerValid(buf) {
		t.Errorf("header round trip: %+v, want %+v (valid %v)", got, h, headerValid(buf))
	}
	buf[100] ^= 1 // the checksum covers the whole 4 KiB
	if headerValid(buf) {
		t.Error("header with a flipped reserved bit is valid")
	}
	re := regionEntry{GUID: batGUID, FileOffset: 2 * miB, Length: miB, Required: true}
	rb := make([]byte, regionEntryLen)
	re.encode(rb)
	if got := decodeRegionEntry(rb); got != re {
		t.Errorf("region entry round trip: %+v, want %+v", got, re)
	}
	me := metadataEntry{ItemID: page83GUID, Offset: 65536, Length: 16, Flags: 6}
	mb := make([]byte, metadataEntryLen)
	me.encode(mb)
	if got := decodeMetadataEntry(mb); got != me {
		t.Errorf("metadata entry round trip: %+v, want %+v", got, me)
	}
	lh := logEntryHeader{Checksum: 1, EntryLength: 8192, Tail: 4096, Sequence: 9, DescriptorCount: 1,
		LogGUID: newGUID(), FlushedFileOffset: 5, LastFileOffset: 6, signatureOK: true}
	lb := make([]byte, logEntryHdrLen)
	lh.encode(lb)
	if got := decodeLogEntryHeader(lb); got != lh {
		t.Errorf("log entry header round trip: %+v, want %+v", got, lh)
	}
	if binary.LittleEndian.Uint32(batGUID[:]) != 0x2dc27766 || batGUID[8] != 0x9d {
		t.Errorf("BAT GUID bytes %x", batGUID)
	}
}

func TestBATLayout(t *testing.T) {
	for _, tc := range []struct {
		size, blockSize, chunkRatio, want int64
	}{
		{100 << 20, 8 << 20, 512, 13},            // 13 blocks, no bitmap entry needed
		{1 << 20, 1 << 20, 4096, 1},              // one block
		{0, 8 << 20, 512, 8388607},               // QEMU's 32-bit wrap for an empty image
		{4097 << 20, 1 << 20, 4096, 4097 + 1},    // one bitmap entry after 4096 blocks
		{8192 << 20, 1 << 20, 4096, 8192 + 1},    // exactly two chunks: the last bitmap entry is not counted
		{64 << 40, 256 << 20, 32, 262144 + 8191}, // the largest image
	} {
		if got := batEntryCount(tc.size, tc.blockSize, tc.chunkRatio); got != tc.want {
			t.Errorf("batEntryCount(%d, %d, %d) = %d, want %d", tc.size, tc.blockSize, tc.chunkRatio, got, tc.want)
		}
	}
	img := &Image{chunkRatio: 4}
	for n, want := range []int64{0, 1, 2, 3, 5, 6, 7, 8, 10} {
		if got := img.batIndex(int64(n)); got != want {
			t.Errorf("batIndex(%d) = %d, want %d", n, got, want)
		}
		if got := img.blockIndex(want); got != int64(n) {
			t.Errorf("blockIndex(%d) = %d, want %d", want, got, n)
		}
	}
}
