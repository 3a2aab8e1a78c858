package qed

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// fuzzSeeds are small images made by qemu-img and written by qemu-io
// (4 KiB clusters keep them small): data, zero clusters and a backing
// file name.
func fuzzSeeds(f *testing.F) [][]byte {
	formatstest.RequireQemu(f)
	dir := f.TempDir()
	var seeds [][]byte
	write := func(name string) {
		formatstest.QemuIO(f, "qed", name, "write -P 1 0 1k", "write -z 8k 8k", "write -P 2 600k 12k")
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	a, b := filepath.Join(dir, "a.qed"), filepath.Join(dir, "b.qed")
	formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", a, "1M")
	write(a)
	formatstest.Exec(f, "qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", "-b", "a.qed", "-F", "qed", b)
	write(b)
	return seeds
}

// FuzzOpen opens arbitrary bytes as a QED image (without its backing
// file), checks it, walks its block status and reads it: nothing may
// panic, hang or allocate beyond the limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img := formatstest.OpenHostile(t, "qed", data)
		if img == nil {
			return
		}
		img.(formats.Checker).Check(t.Context(), formats.CheckReadOnly, func(string) {})
		formatstest.WalkHostile(t, img)
	})
}

// FuzzHeader checks that the header codec keeps every byte and that a
// header that validates keeps its L1 table inside the file.
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
		if validClusterSize(uint64(h.ClusterSize)) {
			fileSize &^= int64(h.ClusterSize) - 1 // as load rounds it
		}
		if h.validate(fileSize) == nil && int64(h.L1TableOffset)+h.tableBytes() > fileSize {
			t.Fatalf("valid header with an L1 table [%#x, +%d) outside a %d-byte file", h.L1TableOffset, h.tableBytes(), fileSize)
		}
	})
}
