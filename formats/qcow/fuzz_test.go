package qcow

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// fuzzSeeds are small images made by qemu-img and written by qemu-io:
// plain, compressed and zero-written clusters, and a backing file name.
func fuzzSeeds(f *testing.F) [][]byte {
	for _, p := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			return nil
		}
	}
	dir := f.TempDir()
	var seeds [][]byte
	for i, c := range [][]string{
		{"create", "-q", "-f", "qcow", "a.qcow", "100k"},
		// Clusters are 512 bytes with a backing file.
		{"create", "-q", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", "b.qcow", "100k"},
	} {
		compressed := []string{"write -c -P 2 8k 4k", "write -c -P 2 8k 512"}[i]
		cmd := exec.Command("qemu-img", c...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			f.Fatalf("seed %d: %v: %s", i, err, out)
		}
		name := c[len(c)-2]
		cmd = exec.Command("qemu-io", "-f", "qcow", "-c", "write -P 1 0 1k", "-c", compressed,
			"-c", "write -z 20k 4k", name)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			f.Fatalf("seed %d: %v: %s", i, err, out)
		}
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzOpen opens arbitrary bytes as a qcow image (without its backing
// file), walks its block status and reads it: nothing may panic, hang or
// allocate beyond the limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		name := filepath.Join(t.TempDir(), "fuzz.qcow")
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: "qcow", ReadOnly: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		buf := make([]byte, 4096)
		for off, i := int64(0), 0; off < img.Size() && i < 300; i++ {
			e, err := img.BlockStatus(off, img.Size()-off)
			if err != nil {
				return
			}
			if e.Length <= 0 {
				t.Fatalf("BlockStatus(%d) returned length %d", off, e.Length)
			}
			img.ReadAt(buf, off)
			off += e.Length
		}
	})
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
