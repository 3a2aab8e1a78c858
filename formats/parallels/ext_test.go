package parallels

import (
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestExtensionMatchesQemu opens images with a format extension cluster
// read-only and compares the outcome with qemu-img info's.
func TestExtensionMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	const cl = 64 << 10
	le := binary.LittleEndian
	// ext builds the extension cluster from its features; edit may spoil
	// it after the checksum is computed.
	ext := func(features []uint64, sizes []uint32, edit func(c []byte)) []byte {
		c := make([]byte, cl)
		le.PutUint64(c, extMagic)
		pos := extHeaderSize
		for i, m := range features {
			le.PutUint64(c[pos:], m)
			le.PutUint32(c[pos+16:], sizes[i])
			pos += featureSize + (int(sizes[i])+7)&^7
		}
		sum := md5.Sum(c[extHeaderSize:])
		copy(c[extChecksumStart:], sum[:])
		if edit != nil {
			edit(c)
		}
		return c
	}
	// QEMU also loads and checks dirty bitmap features, which imgfs
	// skips: those cases check our outcome only (ours is "" when we open
	// the image).
	for _, c := range []struct {
		name    string
		cluster []byte
		bitmap  bool
		ours    string
	}{
		{"empty", ext([]uint64{featureEnd}, []uint32{0}, nil), false, ""},
		{"magic", ext([]uint64{featureEnd}, []uint32{0}, func(c []byte) { c[0] = 1 }), false, ""},
		{"checksum", ext([]uint64{featureEnd}, []uint32{0}, func(c []byte) { c[100] = 1 }), false, ""},
		{"unknown", ext([]uint64{42}, []uint32{0}, nil), false, ""},
		{"data size", ext([]uint64{featureBitmap}, []uint32{cl}, nil), false, ""},
		{"bitmap", ext([]uint64{featureBitmap, featureEnd}, []uint32{100, 0}, nil), true, ""},
		{"no end", ext([]uint64{featureBitmap}, []uint32{cl - extHeaderSize - featureSize - 8}, nil), true,
			"Can not read feature header, as remaining bytes (8) in Format Extension is less than Feature header size (24)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "img")
			if err := formatstest.Create(t, format, name, "size=1M,cluster_size=64k"); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(name)
			le.PutUint64(b[0x38:], uint64(len(b)/sectorSize))
			b = append(b, c.cluster...)
			if err := os.WriteFile(name, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if c.bitmap {
				img, err := formats.Open(name, formats.OpenOptions{Format: format, ReadOnly: true})
				if err == nil {
					img.Close()
				}
				if got := fmt.Sprint(err); c.ours == "" && err != nil || c.ours != "" && got != c.ours {
					t.Fatalf("got %v, want %q", err, c.ours)
				}
				return
			}
			out, qerr := exec.Command("qemu-img", "info", "-U", "-f", format, name).CombinedOutput()
			img, err := formats.Open(name, formats.OpenOptions{Format: format, ReadOnly: true})
			if qerr == nil {
				if err != nil {
					t.Fatalf("qemu opens it, we fail: %v", err)
				}
				img.Close()
				formatstest.SameInfoAndMap(t, format, name)
				return
			}
			if err == nil {
				img.Close()
				t.Fatalf("qemu fails (%s), we open it", out)
			}
			if want := "qemu-img: Could not open '" + name + "': " + err.Error() + "\n"; string(out) != want {
				t.Fatalf("qemu:\n%s\nours:\n%s", out, want)
			}
		})
	}
}
