package vmdk_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// Extent kinds qemu-img cannot create are built here by hand: a VMDK3
// ("COWD") VMFSSPARSE extent and an ESXi seSparse extent, each behind a
// text descriptor. qemu-img reads them; we must read them alike.

func put32(b []byte, off int, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
func put64(b []byte, off int, v uint64) { binary.LittleEndian.PutUint64(b[off:], v) }

// cowdExtent is 1 MiB in 8 KiB grains: grain 0 holds 0x11, grain 3 0x33.
func cowdExtent() []byte {
	const grainSectors, l1At, gtAt, dataAt = 16, 4, 5, 40
	b := make([]byte, (dataAt+2*grainSectors)*512)
	copy(b, "COWD")
	h := b[4:]
	put32(h, 0, 1)    // version
	put32(h, 4, 3)    // flags
	put32(h, 8, 2048) // disk sectors
	put32(h, 12, grainSectors)
	put32(h, 16, l1At) // l1dir offset (sectors)
	put32(h, 20, 1)    // l1dir size
	put32(b, l1At*512, gtAt)
	put32(b, gtAt*512, dataAt)
	put32(b, gtAt*512+3*4, dataAt+grainSectors)
	copy(b[dataAt*512:], bytes.Repeat([]byte{0x11}, grainSectors*512))
	copy(b[(dataAt+grainSectors)*512:], bytes.Repeat([]byte{0x33}, grainSectors*512))
	return b
}

// seSparseExtent is 1 MiB in 4 KiB grains: grain 0 holds 0x44, grain 1
// is zeroed, grain 5 holds 0x55.
func seSparseExtent() []byte {
	const volAt, gdAt, gtAt, grainsAt = 1, 2, 3, 67
	b := make([]byte, (grainsAt+16)*512)
	put64(b, 0, 0xcafebabe)
	put64(b, 8, 0x0000000200000001)
	put64(b, 16, 2048) // capacity
	put64(b, 24, 8)    // grain size
	put64(b, 32, 64)   // grain table size
	put64(b, 80, volAt)
	put64(b, 88, 1)
	put64(b, 128, gdAt)
	put64(b, 136, 1)
	put64(b, 144, gtAt)
	put64(b, 152, 64)
	put64(b, 192, grainsAt)
	put64(b, 200, 16)
	put64(b, volAt*512, 0xcafecafe)
	put64(b, gdAt*512, 0x1000000000000000)
	put64(b, gtAt*512, 0x3000000000000000)
	put64(b, gtAt*512+8, 0x2000000000000000)
	put64(b, gtAt*512+5*8, 0x3001000000000000)
	copy(b[grainsAt*512:], bytes.Repeat([]byte{0x44}, 4096))
	copy(b[(grainsAt+8)*512:], bytes.Repeat([]byte{0x55}, 4096))
	return b
}

func descriptorFor(createType, line string) []byte {
	return []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"" +
		createType + "\"\n\n# Extent description\n" + line + "\n")
}

func TestHandMadeExtents(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, tc := range []struct {
		name, createType, line string
		extent                 []byte
	}{
		{"cowd", "vmfsSparse", `RW 2048 VMFSSPARSE "e.vmdk"`, cowdExtent()},
		{"sesparse", "seSparse", `RW 2048 SESPARSE "e.vmdk"`, seSparseExtent()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "e.vmdk"), tc.extent, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "d.vmdk"), descriptorFor(tc.createType, tc.line), 0o644); err != nil {
				t.Fatal(err)
			}
			name := filepath.Join(dir, "d.vmdk")
			got := formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vmdk", ReadOnly: true}))
			if bytes.Count(got, []byte{0}) > len(got)-8192 {
				t.Errorf("the extent's grains read as zeroes")
			}
			formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "d.vmdk"))
		})
	}
	// seSparse is read-only.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "e.vmdk"), seSparseExtent(), 0o644)
	os.WriteFile(filepath.Join(dir, "d.vmdk"), descriptorFor("seSparse", `RW 2048 SESPARSE "e.vmdk"`), 0o644)
	if img, err := formats.Open(filepath.Join(dir, "d.vmdk"), formats.OpenOptions{Format: "vmdk"}); err == nil {
		img.Close()
		t.Errorf("opening a seSparse image read-write succeeded")
	}
}
