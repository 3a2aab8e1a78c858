package parallels

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// FuzzOpen opens arbitrary bytes as a parallels image, read-only, and
// reads and maps it: nothing may panic or allocate without bound.
func FuzzOpen(f *testing.F) {
	for _, opts := range []string{"size=1M,cluster_size=64k", "size=3M,cluster_size=1000"} {
		name := filepath.Join(f.TempDir(), "seed")
		if err := createImage(f, name, opts); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(name)
		f.Add(b)
		b = append([]byte(nil), b...)
		copy(b, magicOld)
		b[64] = 200
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		name := filepath.Join(t.TempDir(), "img")
		if err := os.WriteFile(name, b, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: format, ReadOnly: true})
		if err != nil {
			return
		}
		defer img.Close()
		p := make([]byte, 64<<10)
		img.ReadAt(p, 0)
		img.ReadAt(p, max(img.Size()-1000, 0))
		for off, i := int64(0), 0; off < img.Size() && i < 1000; i++ {
			e, err := img.BlockStatus(off, img.Size()-off)
			if err != nil || e.Length <= 0 {
				break
			}
			off += e.Length
		}
	})
}
