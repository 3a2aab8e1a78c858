package bochs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

const format = "bochs"

// extent is one stored extent of a fixture: its sector bitmap and data.
type extent struct {
	bitmap byte
	data   []byte
}

// build returns a Bochs growing image of disk bytes with 4 KiB extents,
// the catalog given and the extents stored in order.
func build(v uint32, disk uint64, catalog []uint32, extents []extent) []byte {
	const extentSize = 4096
	h := make([]byte, headerSize)
	copy(h, magic)
	copy(h[32:], typeRedolog)
	copy(h[48:], typeGrowing)
	le := binary.LittleEndian
	le.PutUint32(h[64:], v)
	le.PutUint32(h[68:], headerSize)
	le.PutUint32(h[72:], uint32(len(catalog)))
	le.PutUint32(h[76:], 1)
	le.PutUint32(h[80:], extentSize)
	if v == version1 {
		le.PutUint64(h[84:], disk)
	} else {
		le.PutUint64(h[88:], disk)
	}
	out := bytes.NewBuffer(h)
	for _, e := range catalog {
		binary.Write(out, le, e)
	}
	for _, e := range extents {
		bm := make([]byte, sectorSize)
		bm[0] = e.bitmap
		out.Write(bm)
		d := make([]byte, extentSize)
		copy(d, e.data)
		out.Write(d)
	}
	return out.Bytes()
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)*3 + seed
	}
	return b
}

// fixture: 9 KiB in three extents; the first stored fully, the second
// unallocated, the third stored with every other sector.
func fixture(v uint32) []byte {
	return build(v, 9*1024, []uint32{1, unallocated, 0},
		[]extent{{0x55, pattern(4096, 1)}, {0xff, pattern(4096, 2)}})
}

func TestReadMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, v := range []uint32{version1, version2} {
		name := formatstest.WriteTemp(t, "img.bochs", fixture(v))
		img := formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true})
		want := formatstest.SameAsQemuRaw(t, img)
		if len(want) != 9*1024 {
			t.Fatalf("version %#x: %d bytes", v, len(want))
		}
		if bytes.Equal(want[8192:8704], make([]byte, 512)) || !bytes.Equal(want[8704:9216], make([]byte, 512)) {
			t.Fatal("fixture does not exercise the sector bitmap")
		}
		p := make([]byte, 1000)
		if _, err := img.ReadAt(p, 300); err != nil || !bytes.Equal(p, want[300:1300]) {
			t.Fatalf("unaligned read: %v", err)
		}
		formatstest.SameInfoAndMap(t, format, name)
		if d := formats.Probe(fixture(v)[:formats.ProbeSize], name); d == nil || d.Name != format {
			t.Fatalf("probe picked %v", d)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	le := binary.LittleEndian
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
		kind error
		msg  string
	}{
		{"type", func(b []byte) []byte { b[48] = 'g'; return b }, formats.ErrWrongFormat, "Image not in Bochs format"},
		{"huge catalog", func(b []byte) []byte { le.PutUint32(b[72:], maxCatalog+1); return b }, formats.ErrUnsupported, "Catalog size is too large"},
		{"small extent", func(b []byte) []byte { le.PutUint32(b[80:], 256); return b }, formats.ErrCorrupt, "Extent size must be at least 512"},
		{"odd extent", func(b []byte) []byte { le.PutUint32(b[80:], 1536); return b }, formats.ErrCorrupt, "Extent size 1536 is not a power of two"},
		{"huge extent", func(b []byte) []byte { le.PutUint32(b[80:], 1<<24); return b }, formats.ErrUnsupported, "Extent size 16777216 is too large"},
		{"small catalog", func(b []byte) []byte { le.PutUint64(b[88:], 1<<20); return b }, formats.ErrCorrupt, "Catalog size is too small for this disk size"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := formats.Open(formatstest.WriteTemp(t, "img.bochs", c.edit(fixture(version2))), formats.OpenOptions{Format: format, ReadOnly: true})
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v with %q", err, c.kind, c.msg)
			}
		})
	}
}

func FuzzOpen(f *testing.F) {
	f.Add(fixture(version1))
	f.Add(fixture(version2))
	f.Fuzz(func(t *testing.T, b []byte) { formatstest.ReadHostile(t, format, b) })
}
