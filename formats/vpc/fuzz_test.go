package vpc

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// fuzzSeeds are small images made by qemu-img: empty dynamic disks and
// a fixed disk with data. A dynamic disk with a block written is 2 MiB,
// too large for the fuzzer to mutate quickly; the fuzzer reaches
// allocated blocks by mutating BAT entries of the empty ones.
func fuzzSeeds(f *testing.F) [][]byte {
	formatstest.RequireQemu(f)
	dir := f.TempDir()
	var seeds [][]byte
	for _, c := range []struct {
		opts, size, write string
	}{
		{"subformat=dynamic", "3M", ""},
		{"subformat=fixed", "512", "write -P 6 0 512"},
		{"force_size=on", "1M", ""},
	} {
		name := filepath.Join(dir, "seed.vhd")
		os.Remove(name)
		formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "vpc", "-o", c.opts, name, c.size)
		if c.write != "" {
			formatstest.QemuIO(f, "vpc", name, c.write)
		}
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzOpen opens arbitrary bytes as a vpc image and walks it: nothing
// may panic, hang or allocate beyond the limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img := formatstest.OpenHostile(t, "vpc", data)
		if img == nil {
			return
		}
		if _, err := img.(formats.Describer).Describe(); err != nil {
			t.Fatal(err)
		}
		formatstest.WalkHostile(t, img)
	})
}

// FuzzFooter checks that the footer and dynamic header codecs keep
// every byte, so a rewritten footer keeps fields imgfs does not use.
func FuzzFooter(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[:dynHeaderSize+footerSize])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < footerSize+dynHeaderSize {
			return
		}
		if got := decodeFooter(data[:footerSize]).encode(); !bytes.Equal(got, data[:footerSize]) {
			t.Fatal("footer does not round-trip")
		}
		dh := data[footerSize : footerSize+dynHeaderSize]
		if got := decodeDynHeader(dh).encode(); !bytes.Equal(got, dh) {
			t.Fatal("dynamic header does not round-trip")
		}
	})
}
