package vdi

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// fuzzSeeds are small dynamic images made by qemu-img (header and block
// map only; a written block would add 1 MiB, too large for the fuzzer
// to mutate quickly, which reaches allocated blocks by mutating block
// map entries instead).
func fuzzSeeds(f *testing.F) [][]byte {
	formatstest.RequireTools(f, "qemu-img")
	dir := f.TempDir()
	var seeds [][]byte
	for _, size := range []string{"1000", "3M", "200M"} {
		name := filepath.Join(dir, "seed.vdi")
		os.Remove(name)
		formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "vdi", name, size)
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzOpen opens arbitrary bytes as a vdi image, walks its block status,
// reads and checks it: nothing may panic, hang or allocate beyond the
// limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img := formatstest.OpenHostile(t, "vdi", data)
		if img == nil {
			return
		}
		if _, err := img.(formats.Checker).Check(t.Context(), formats.CheckReadOnly, func(string) {}); err != nil {
			t.Fatal(err)
		}
		// Block status only looks at the block map in memory: it cannot fail.
		if err := formatstest.WalkHostile(t, img); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzHeader checks that the header codec keeps every byte and that
// validation never panics.
func FuzzHeader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[:headerSize])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < headerSize {
			return
		}
		h := decodeHeader(data)
		if got := h.encode(); !bytes.Equal(got, data[:headerSize]) {
			t.Fatal("header does not round-trip")
		}
		if h.validate() == nil && h.bmapBytes() > maxBlocks*4+sectorSize {
			t.Fatalf("valid header with a %d-byte block map", h.bmapBytes())
		}
	})
}
