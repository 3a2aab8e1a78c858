package dmg

import (
	"bytes"
	"compress/zlib"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

const format = "dmg"

// piece is one chunk of a fixture: its type and guest content (a whole
// number of sectors); zero and ignore chunks store nothing.
type piece struct {
	typ  uint32
	data []byte
}

// compress stores data as a chunk of type typ would.
func compress(t testing.TB, typ uint32, data []byte) []byte {
	switch typ {
	case typeRaw:
		return data
	case typeZlib:
		var b bytes.Buffer
		zw := zlib.NewWriter(&b)
		zw.Write(data)
		zw.Close()
		return b.Bytes()
	case typeBzip2:
		// Go has no bzip2 compressor: use the bzip2 command.
		formatstest.RequireTools(t, "bzip2")
		cmd := exec.Command("bzip2", "-c")
		cmd.Stdin = bytes.NewReader(data)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("bzip2: %v", err)
		}
		return out
	}
	return nil
}

// build returns a dmg image: a data fork with the stored chunks, one mish
// block table (with a comment and a terminator entry, which readers
// skip) in an XML property list or a resource fork, and the koly
// trailer. The mish block's own sector and data offsets are non-zero to
// test that they are added.
func build(t testing.TB, pieces []piece, rsrc bool) []byte {
	const lead = 1024 // bytes before the data fork's chunks
	var data bytes.Buffer
	data.Write(make([]byte, lead))
	be := binary.BigEndian
	mish := make([]byte, mishHeader)
	be.PutUint32(mish, mishMagic)
	be.PutUint32(mish[4:], 1)
	be.PutUint64(mish[24:], lead)
	entry := func(typ uint32, sector, sectors, off, n uint64) {
		e := make([]byte, chunkEntry)
		be.PutUint32(e, typ)
		be.PutUint64(e[8:], sector)
		be.PutUint64(e[16:], sectors)
		be.PutUint64(e[24:], off)
		be.PutUint64(e[32:], n)
		mish = append(mish, e...)
	}
	entry(typeComment, 0, 0, 0, 0)
	var sector uint64
	for _, p := range pieces {
		n := uint64(len(p.data) / sectorSize)
		stored := compress(t, p.typ, p.data)
		entry(p.typ, sector, n, uint64(data.Len()-lead), uint64(len(stored)))
		data.Write(stored)
		sector += n
	}
	entry(typeEnd, sector, 0, 0, 0)
	be.PutUint64(mish[16:], sector)
	be.PutUint32(mish[200:], uint32((len(mish)-mishHeader)/chunkEntry))

	out := bytes.NewBuffer(data.Bytes())
	koly := make([]byte, kolySize)
	be.PutUint32(koly, kolyMagic)
	be.PutUint32(koly[4:], 4)
	be.PutUint32(koly[8:], kolySize)
	be.PutUint64(koly[0x20:], uint64(data.Len()))
	tableOff := uint64(out.Len())
	if rsrc {
		fork := make([]byte, 0x100)
		be.PutUint32(fork, 0x100)
		be.PutUint32(fork[4:], uint32(0x100+4+len(mish)))
		be.PutUint32(fork[8:], uint32(4+len(mish)))
		fork = be.AppendUint32(fork, uint32(len(mish)))
		fork = append(fork, mish...)
		out.Write(fork)
		be.PutUint64(koly[0x28:], tableOff)
		be.PutUint64(koly[0x30:], uint64(len(fork)))
	} else {
		enc := base64.StdEncoding.EncodeToString(mish)
		var lines []string
		for len(enc) > 52 {
			lines, enc = append(lines, "\t\t\t"+enc[:52]), enc[52:]
		}
		lines = append(lines, "\t\t\t"+enc)
		xml := fmt.Sprintf(`<?xml version="1.0" encoding="UTF-8"?>
<plist version="1.0">
<dict>
	<key>resource-fork</key>
	<dict>
		<key>blkx</key>
		<array>
			<dict>
			<key>Data</key>
			<data>
%s
			</data>
			<key>Name</key>
			<string>whole disk</string>
			</dict>
		</array>
	</dict>
</dict>
</plist>
`, strings.Join(lines, "\n"))
		out.WriteString(xml)
		be.PutUint64(koly[0xd8:], tableOff)
		be.PutUint64(koly[0xe0:], uint64(len(xml)))
	}
	be.PutUint64(koly[0x1ec:], sector)
	out.Write(koly)
	return out.Bytes()
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/7) + seed
	}
	return b
}

// fixturePieces has every chunk type QEMU 7.2 as installed reads.
func fixturePieces() []piece {
	return []piece{
		{typeRaw, pattern(2048, 1)},
		{typeZero, make([]byte, 1024)},
		{typeZlib, pattern(4096, 2)},
		{typeIgnore, make([]byte, 512)},
		{typeZlib, bytes.Repeat([]byte("dmg!"), 1024)},
		{typeRaw, pattern(512, 3)},
	}
}

func guest(pieces []piece) []byte {
	var b []byte
	for _, p := range pieces {
		b = append(b, p.data...)
	}
	return b
}

func TestReadMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, c := range []struct{ rsrc, odd bool }{{false, false}, {true, false}, {false, true}} {
		rsrc := c.rsrc
		b := build(t, fixturePieces(), rsrc)
		if c.odd {
			// A file that is no multiple of 512 bytes: the trailer is
			// searched for.
			k := len(b) - kolySize
			b = append(b[:k:k], append(make([]byte, 37), b[k:]...)...)
		}
		name := formatstest.WriteTemp(t, "img.dmg", b)
		img := formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true})
		want := formatstest.SameAsQemuRaw(t, img)
		if !bytes.Equal(want, guest(fixturePieces())) {
			t.Fatal("qemu-img does not read the fixture as built")
		}
		p := make([]byte, 3000)
		if _, err := img.ReadAt(p, 1500); err != nil || !bytes.Equal(p, want[1500:4500]) {
			t.Fatalf("unaligned read: %v", err)
		}
		formatstest.SameInfoAndMap(t, format, name)
		if d := formats.Probe(make([]byte, formats.ProbeSize), name); d == nil || d.Name != format {
			t.Fatalf("probe picked %v", d)
		}
	}
}

// TestBzip2: QEMU reads bzip2 chunks only with its dmg-bz2 module, which
// the installed qemu-img lacks, so the data is checked against what was
// compressed.
func TestBzip2(t *testing.T) {
	pieces := []piece{{typeBzip2, pattern(8192, 5)}, {typeZlib, pattern(1024, 6)}}
	img := formatstest.Open(t, formatstest.WriteTemp(t, "img.dmg", build(t, pieces, false)), formats.OpenOptions{Format: format, ReadOnly: true})
	if got := formatstest.ReadAll(t, img); !bytes.Equal(got, guest(pieces)) {
		t.Fatalf("bzip2 chunk differs at %d", formatstest.FirstDiff(got, guest(pieces)))
	}
}

// TestUnsupportedChunks: lzfse and ADC chunks open but fail to read with
// ErrUnsupported; sectors without a chunk fail with an I/O error.
func TestUnsupportedChunks(t *testing.T) {
	for _, typ := range []uint32{typeLZFSE, typeADC} {
		pieces := []piece{{typeRaw, pattern(512, 1)}, {typ, pattern(512, 2)}}
		b := build(t, pieces, false)
		img := formatstest.Open(t, formatstest.WriteTemp(t, "img.dmg", b), formats.OpenOptions{Format: format, ReadOnly: true})
		if _, err := img.ReadAt(make([]byte, 512), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := img.ReadAt(make([]byte, 512), 512); !errors.Is(err, formats.ErrUnsupported) {
			t.Fatalf("type %#x: got %v", typ, err)
		}
	}
	b := build(t, []piece{{typeRaw, pattern(512, 1)}}, false)
	binary.BigEndian.PutUint64(b[len(b)-kolySize+0x1ec:], 4)
	img := formatstest.Open(t, formatstest.WriteTemp(t, "img.dmg", b), formats.OpenOptions{Format: format, ReadOnly: true})
	if _, err := img.ReadAt(make([]byte, 512), 1024); !errors.Is(err, syscall.EIO) {
		t.Fatalf("uncovered sector: got %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	be := binary.BigEndian
	koly := func(b []byte) []byte { return b[len(b)-kolySize:] }
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
		kind error
		msg  string
	}{
		{"no koly", func(b []byte) []byte { koly(b)[0] = 'K'; return b }, formats.ErrWrongFormat, "Could not locate UDIF trailer in dmg file"},
		{"short", func(b []byte) []byte { return b[:100] }, formats.ErrWrongFormat, "dmg file must be at least 512 bytes long"},
		{"data fork", func(b []byte) []byte { be.PutUint64(koly(b)[0x18:], 1<<40); return b }, formats.ErrCorrupt, "data fork offset"},
		{"rsrc fork", func(b []byte) []byte { be.PutUint64(koly(b)[0x30:], 1<<40); return b }, formats.ErrCorrupt, "resource fork"},
		{"no tables", func(b []byte) []byte { be.PutUint64(koly(b)[0x30:], 0); return b }, formats.ErrCorrupt, "neither"},
		{"chunk length", func(b []byte) []byte { setChunk(b, 32, maxLength+1); return b }, formats.ErrUnsupported, "length 67108865 for chunk 0 is larger than max (67108864)"},
		{"chunk sectors", func(b []byte) []byte { setChunk(b, 16, maxSectors+1); return b }, formats.ErrUnsupported, "sector count 131073 for chunk 0 is larger than max (131072)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := c.edit(build(t, fixturePieces(), true))
			_, err := formats.Open(formatstest.WriteTemp(t, "img.dmg", b), formats.OpenOptions{Format: format, ReadOnly: true})
			// QEMU's message is mostly a bare "Invalid argument"; the
			// error's kind says more.
			detail := err
			if e, ok := err.(*formats.Error); ok && strings.HasSuffix(e.Msg, "': Invalid argument") {
				detail = e.Kind
			}
			if !errors.Is(err, c.kind) || !strings.Contains(detail.Error(), c.msg) {
				t.Fatalf("got %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}
}

// setChunk sets a 64-bit field of the first data chunk entry (after the
// comment entry) of a resource fork fixture.
func setChunk(b []byte, field int, v uint64) {
	i := bytes.Index(b, []byte("mish"))
	binary.BigEndian.PutUint64(b[i+mishHeader+chunkEntry+field:], v)
}

func FuzzOpen(f *testing.F) {
	f.Add(build(f, fixturePieces(), false))
	f.Add(build(f, fixturePieces(), true))
	f.Fuzz(func(t *testing.T, b []byte) { formatstest.ReadHostile(t, format, b) })
}
