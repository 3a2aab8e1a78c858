package qcow

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats/formatstest"
)

// fuzzSeeds are small images made by qemu-img and written by qemu-io:
// plain, compressed and zero-written clusters, and a backing file name.
func fuzzSeeds(f *testing.F) [][]byte {
	formatstest.RequireQemu(f)
	dir := f.TempDir()
	var seeds [][]byte
	write := func(name, compressed string) {
		formatstest.QemuIO(f, "qcow", name, "write -P 1 0 1k", compressed, "write -z 20k 4k")
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	a, b := filepath.Join(dir, "a.qcow"), filepath.Join(dir, "b.qcow")
	formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "qcow", a, "100k")
	write(a, "write -c -P 2 8k 4k")
	// Clusters are 512 bytes with a backing file.
	formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", b, "100k")
	write(b, "write -c -P 2 8k 512")
	return seeds
}

// FuzzOpen opens arbitrary bytes as a qcow image (without its backing
// file), walks its block status and reads it: nothing may panic, hang or
// allocate beyond the limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) { formatstest.ReadHostile(t, "qcow", data) })
}

// FuzzHeader checks that the header codec keeps every byte and that a
// header that validates bounds its L1 table by the file.
func FuzzHeader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[:headerSize], int64(len(s)))
	}
	f.Fuzz(func(t *testing.T, data []byte, fileSize int64) {
		if len(data) < headerSize || fileSize < 0 {
			return
		}
		h := decodeHeader(data)
		if got := h.encode(); !bytes.Equal(got, data[:headerSize]) {
			t.Fatal("header does not round-trip")
		}
		if h.validate(fileSize) == nil && int64(8*h.l1Entries()) > fileSize {
			t.Fatalf("valid header with a %d-entry L1 table in a %d-byte file", h.l1Entries(), fileSize)
		}
	})
}
