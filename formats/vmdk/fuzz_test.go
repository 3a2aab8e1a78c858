package vmdk_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// FuzzOpen opens arbitrary bytes as a VMDK image (a sparse header, a
// stream footer or a descriptor) and reads and maps it: no panics, no
// allocation beyond what the file holds, errors instead. Seeds are
// images qemu-img makes, cut to their metadata.
func FuzzOpen(f *testing.F) {
	f.Add(cowdExtent())
	f.Add(seSparseExtent())
	f.Add(descriptorFor("monolithicFlat", `RW 8 FLAT "missing" 0`))
	formatstest.RequireQemu(f)
	dir := f.TempDir()
	for i, opts := range []string{"subformat=monolithicSparse", "subformat=streamOptimized", "zeroed_grain=on"} {
		name := filepath.Join(dir, "seed.vmdk")
		os.Remove(name)
		formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, name, "1M")
		if i == 1 {
			formatstest.QemuIO(f, "vmdk", name, "write -P 7 0 64k")
		}
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:min(len(b), 24<<10)])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		name := filepath.Join(t.TempDir(), "f.vmdk")
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk", ReadOnly: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		if d, ok := img.(formats.Describer); ok {
			d.Describe()
		}
		buf := make([]byte, 4096)
		for _, off := range []int64{0, 65536, img.Size() / 2, img.Size() - 4096} {
			if off >= 0 {
				img.ReadAt(buf, off)
			}
		}
		for off, n := int64(0), 0; off < img.Size() && n < 64; n++ {
			e, err := img.BlockStatus(off, img.Size()-off)
			if err != nil {
				break
			}
			if e.Length <= 0 {
				t.Fatalf("BlockStatus(%d) length %d", off, e.Length)
			}
			off += e.Length
		}
	})
}
