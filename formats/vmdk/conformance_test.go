package vmdk_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw" // creates the files of new images
	_ "github.com/imgfs/imgfs/formats/vmdk"
)

// TestConformance runs the driver suite on every subformat that takes
// arbitrary writes. streamOptimized takes each grain once, whole, as in
// QEMU, so it has its own tests (stream_test.go).
func TestConformance(t *testing.T) {
	for _, opts := range []string{
		"subformat=monolithicSparse",
		"subformat=monolithicSparse,zeroed_grain=on",
		"subformat=monolithicFlat",
		"subformat=twoGbMaxExtentSparse",
	} {
		t.Run(opts, func(t *testing.T) {
			formatstest.Run(t, formatstest.Created("vmdk", opts))
		})
	}
	// Images this small have one extent per subformat; several extents
	// of different kinds, with boundaries inside grains, come from a
	// hand-written descriptor.
	t.Run("extents", func(t *testing.T) { formatstest.Run(t, multiExtent) })
}

// multiExtent makes an image of a sparse extent of 1 MiB, a flat
// extent at an offset in its file, and a sparse extent with zeroed
// grains for the rest (whose size is not whole grains: QEMU and imgfs
// agree on that only for the last extent, see Image.chunk).
func multiExtent(t *testing.T, size int64) formats.Image {
	t.Helper()
	dir := t.TempDir()
	d := formats.Lookup("vmdk")
	mk := func(name, opts string, sectors int64) {
		o := formats.NewOptions(d.CreateSpecs())
		if err := o.Parse(fmt.Sprintf("%s,size=%d", opts, sectors*512)); err != nil {
			t.Fatal(err)
		}
		if err := d.Create(filepath.Join(dir, name), o); err != nil {
			t.Fatal(err)
		}
	}
	rest := size/512 - 2048 - 3000
	mk("a.vmdk", "subformat=monolithicSparse", 2048)
	mk("c.vmdk", "zeroed_grain=on", rest)
	if err := os.WriteFile(filepath.Join(dir, "b.raw"), make([]byte, 100*512), 0o644); err != nil {
		t.Fatal(err)
	}
	desc := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n"+
		"RW 2048 SPARSE \"a.vmdk\"\nRW 3000 FLAT \"b.raw\" 100\nRW %d SPARSE \"c.vmdk\"\n", rest)
	name := filepath.Join(dir, "multi.vmdk")
	if err := os.WriteFile(name, []byte(desc), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk"})
	if err != nil {
		t.Fatal(err)
	}
	return img
}
