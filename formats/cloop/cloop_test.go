package cloop

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
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

func writeFile(t testing.TB, b []byte) string {
	name := filepath.Join(t.TempDir(), "img.cloop")
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestReadMatchesQemu(t *testing.T) {
	haveQemu(t)
	name := writeFile(t, fixture())
	img := openImage(t, name, true)
	if img.Size() != 3*4096 {
		t.Fatalf("size %d", img.Size())
	}
	got, want := readAll(t, img), rawOf(t, name)
	if d := firstDiff(got, want); d >= 0 {
		t.Fatalf("differs from qemu-img convert at %d", d)
	}
	// Unaligned reads across blocks.
	p := make([]byte, 5000)
	if _, err := img.ReadAt(p, 3000); err != nil || !bytes.Equal(p, want[3000:8000]) {
		t.Fatalf("unaligned read: %v", err)
	}
	compareReports(t, name)
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
			_, err := formats.Open(writeFile(t, c.edit(fixture())), formats.OpenOptions{Format: format, ReadOnly: true})
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
	img := openImage(t, writeFile(t, b), true)
	if _, err := img.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("oversized block read without error")
	}
	b = build(1024, [][]byte{make([]byte, 512)})
	img = openImage(t, writeFile(t, b), true)
	if _, err := img.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("short block read without error")
	}
}

func TestReadOnly(t *testing.T) {
	name := writeFile(t, fixture())
	if _, err := formats.Open(name, formats.OpenOptions{Format: format}); err == nil {
		t.Fatal("opened read-write")
	}
}

func FuzzOpen(f *testing.F) {
	f.Add(fixture())
	f.Add(build(512, [][]byte{make([]byte, 512)}))
	f.Fuzz(func(t *testing.T, b []byte) {
		img, err := formats.Open(writeFile(t, b), formats.OpenOptions{Format: format, ReadOnly: true})
		if err != nil {
			return
		}
		defer img.Close()
		p := make([]byte, 64<<10)
		img.ReadAt(p, 0)
		img.ReadAt(p, max(img.Size()-1000, 0))
		img.BlockStatus(0, img.Size())
	})
}

// TestCreateCompressedFS reads an image made by cloop-utils'
// create_compressed_fs, when installed, and compares it with qemu-img.
func TestCreateCompressedFS(t *testing.T) {
	haveQemu(t)
	if _, err := exec.LookPath("create_compressed_fs"); err != nil {
		t.Skip("create_compressed_fs (cloop-utils) not installed")
	}
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
	run(t, "create_compressed_fs", "-B", "65536", in, name)
	img := openImage(t, name, true)
	got, want := readAll(t, img), rawOf(t, name)
	if d := firstDiff(got, want); d >= 0 {
		t.Fatalf("differs from qemu-img convert at %d", d)
	}
	if !bytes.Equal(got[:len(content)], content) {
		t.Fatal("content differs from the input")
	}
	compareReports(t, name)
}
