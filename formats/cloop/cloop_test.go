package cloop

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

const format = "cloop"

// build returns a cloop image of the blocks, each blockSize bytes, with
// each compressed by zlib.
func build(blockSize uint32, blocks [][]byte) []byte {
	var out bytes.Buffer
	out.WriteString(magic)
	out.Write(make([]byte, headerSize-len(magic)))
	binary.Write(&out, binary.BigEndian, blockSize)
	binary.Write(&out, binary.BigEndian, uint32(len(blocks)))
	var data bytes.Buffer
	base := uint64(headerSize + 8 + 8*(len(blocks)+1))
	for _, b := range blocks {
		binary.Write(&out, binary.BigEndian, base+uint64(data.Len()))
		zw := zlib.NewWriter(&data)
		zw.Write(b)
		zw.Close()
	}
	binary.Write(&out, binary.BigEndian, base+uint64(data.Len()))
	out.Write(data.Bytes())
	return out.Bytes()
}

// fixture is a small image: a patterned block, a zero block and a text
// block.
func fixture() []byte {
	const bs = 4096
	a := make([]byte, bs)
	for i := range a {
		a[i] = byte(i * 7)
	}
	c := bytes.Repeat([]byte("cloop "), bs/6+1)[:bs]
	return build(bs, [][]byte{a, make([]byte, bs), c})
}

func TestReadMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	name := formatstest.WriteTemp(t, "img.cloop", fixture())
	img := formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true})
	if img.Size() != 3*4096 {
		t.Fatalf("size %d", img.Size())
	}
	want := formatstest.SameAsQemuRaw(t, img)
	// Unaligned reads across blocks.
	p := make([]byte, 5000)
	if _, err := img.ReadAt(p, 3000); err != nil || !bytes.Equal(p, want[3000:8000]) {
		t.Fatalf("unaligned read: %v", err)
	}
	formatstest.SameInfoAndMap(t, format, name)
	if d := formats.Probe(fixture()[:formats.ProbeSize], name); d == nil || d.Name != format {
		t.Fatalf("probe picked %v", d)
	}
}

func TestOpenErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
		kind error
		msg  string
	}{
		{"block size not sector multiple", func(b []byte) []byte { binary.BigEndian.PutUint32(b[128:], 1000); return b }, formats.ErrCorrupt, "block_size 1000 must be a multiple of 512"},
		{"zero block size", func(b []byte) []byte { binary.BigEndian.PutUint32(b[128:], 0); return b }, formats.ErrCorrupt, "block_size cannot be zero"},
		{"huge block size", func(b []byte) []byte { binary.BigEndian.PutUint32(b[128:], 128<<20); return b }, formats.ErrUnsupported, "block_size 134217728 must be 64 MB or less"},
		{"too many blocks", func(b []byte) []byte { binary.BigEndian.PutUint32(b[132:], 0xffffffff); return b }, formats.ErrCorrupt, "n_blocks 4294967295 must be 536870910 or less"},
		{"too many offsets", func(b []byte) []byte { binary.BigEndian.PutUint32(b[132:], 0x10000000); return b }, formats.ErrUnsupported, "image requires too many offsets, try increasing block size"},
		{"table past EOF", func(b []byte) []byte { binary.BigEndian.PutUint32(b[132:], 1000); return b }, formats.ErrCorrupt, "extends past the end"},
		{"decreasing", func(b []byte) []byte { binary.BigEndian.PutUint64(b[136+16:], 1); return b }, formats.ErrCorrupt, "offsets not monotonically increasing at index 2, image file is corrupt"},
		{"huge block", func(b []byte) []byte { binary.BigEndian.PutUint64(b[136+24:], 1<<40); return b }, formats.ErrCorrupt, "invalid compressed block size at index 3, image file is corrupt"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := formats.Open(formatstest.WriteTemp(t, "img.cloop", c.edit(fixture())), formats.OpenOptions{Format: format, ReadOnly: true})
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}
}

// TestBadBlock: a block that does not inflate to the block size is an
// I/O error, as in QEMU.
func TestBadBlock(t *testing.T) {
	b := build(512, [][]byte{make([]byte, 1024)})
	img := formatstest.Open(t, formatstest.WriteTemp(t, "img.cloop", b), formats.OpenOptions{Format: format, ReadOnly: true})
	if _, err := img.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("oversized block read without error")
	}
	b = build(1024, [][]byte{make([]byte, 512)})
	img = formatstest.Open(t, formatstest.WriteTemp(t, "img.cloop", b), formats.OpenOptions{Format: format, ReadOnly: true})
	if _, err := img.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("short block read without error")
	}
}

func TestReadOnly(t *testing.T) {
	name := formatstest.WriteTemp(t, "img.cloop", fixture())
	if _, err := formats.Open(name, formats.OpenOptions{Format: format}); err == nil {
		t.Fatal("opened read-write")
	}
}

func FuzzOpen(f *testing.F) {
	f.Add(fixture())
	f.Add(build(512, [][]byte{make([]byte, 512)}))
	f.Fuzz(func(t *testing.T, b []byte) { formatstest.ReadHostile(t, format, b) })
}

// TestCreateCompressedFS reads an image made by cloop-utils'
// create_compressed_fs and compares it with qemu-img.
func TestCreateCompressedFS(t *testing.T) {
	formatstest.RequireQemu(t)
	formatstest.RequireTools(t, "create_compressed_fs")
	dir := t.TempDir()
	in := filepath.Join(dir, "in")
	content := append(bytes.Repeat([]byte("imgfs cloop "), 20000), make([]byte, 150000)...)
	for i := range 50000 {
		content = append(content, byte(i*i>>3))
	}
	if err := os.WriteFile(in, content, 0o644); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(dir, "out.cloop")
	formatstest.Exec(t, "create_compressed_fs", "-B", "65536", in, name)
	img := formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true})
	got := formatstest.SameAsQemuRaw(t, img)
	if !bytes.Equal(got[:len(content)], content) {
		t.Fatal("content differs from the input")
	}
	formatstest.SameInfoAndMap(t, format, name)
}
