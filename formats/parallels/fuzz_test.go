package parallels

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats/formatstest"
)

// FuzzOpen opens arbitrary bytes as a parallels image, read-only, and
// reads and maps it: nothing may panic or allocate without bound.
func FuzzOpen(f *testing.F) {
	for _, opts := range []string{"size=1M,cluster_size=64k", "size=3M,cluster_size=1000"} {
		name := filepath.Join(f.TempDir(), "seed")
		if err := formatstest.Create(f, format, name, opts); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(name)
		f.Add(b)
		b = append([]byte(nil), b...)
		copy(b, magicOld)
		b[64] = 200
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { formatstest.ReadHostile(t, format, b) })
}
