package qcow2

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// fuzzSeeds builds small qemu-made images (512-byte clusters keep them
// a few KiB) covering the features the parsers handle.
func fuzzSeeds(f *testing.F) [][]byte {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return nil
	}
	dir := f.TempDir()
	var seeds [][]byte
	for i, c := range []struct {
		opts string
		cmds [][]string
	}{
		{"cluster_size=512", [][]string{{"qemu-io", "-c", "write -P 1 0 3k", "-c", "write -c -P 2 8k 512", "-c", "write -z 16k 1k"}}},
		{"cluster_size=512,compat=0.10", [][]string{{"qemu-io", "-c", "write -P 1 1k 2k"}, {"qemu-img", "snapshot", "-c", "s"}}},
		{"cluster_size=16k,extended_l2=on,compression_type=zstd", [][]string{{"qemu-io", "-c", "write -P 1 2k 2k", "-c", "write -c -P 3 32k 16k"}}},
		{"cluster_size=512,refcount_bits=1,lazy_refcounts=on", [][]string{{"qemu-img", "bitmap", "--add", "@", "b"}}},
		{"cluster_size=512,backing_file=base.qcow2,backing_fmt=qcow2", nil},
	} {
		name := filepath.Join(dir, "seed.qcow2")
		os.Remove(name)
		args := []string{"create", "-q", "-f", "qcow2", "-u", "-o", c.opts, name, "64k"}
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			f.Fatalf("seed %d: %v: %s", i, err, out)
		}
		for _, cmd := range c.cmds {
			args := append([]string(nil), cmd[1:]...)
			if args[len(args)-2] == "@" {
				args[len(args)-2] = name
			} else {
				args = append(args, name)
			}
			if out, err := exec.Command(cmd[0], args...).CombinedOutput(); err != nil {
				f.Fatalf("seed %d: %v: %s", i, err, out)
			}
		}
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzOpen opens arbitrary bytes as an image, reads a few ranges and
// asks for block status and info: nothing may panic, hang or allocate
// beyond the hostile-image limits.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, data []byte) {
		name := filepath.Join(t.TempDir(), "f.qcow2")
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := formats.Open(name, formats.OpenOptions{Format: "qcow2", ReadOnly: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		size := img.Size()
		buf := make([]byte, 4096)
		for _, off := range []int64{0, 512, 4000, 65536 - 100, size / 2, size - 1} {
			if off < 0 || off >= size {
				continue
			}
			img.ReadAt(buf, off)
			if e, err := img.BlockStatus(off, min(size-off, 1<<30)); err == nil && e.Length <= 0 {
				t.Fatalf("empty extent at %d", off)
			}
		}
		img.(formats.Describer).Describe()
	})
}

// FuzzHeader decodes arbitrary first clusters; whatever decodes must
// encode and decode again to the same header.
func FuzzHeader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[:min(len(s), 512)])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := DecodeHeaderCluster(data)
		if err != nil || uint64(len(data)) < h.ClusterSize() {
			return
		}
		buf, err := h.Encode()
		if err != nil {
			return
		}
		h2, err := DecodeHeaderCluster(buf)
		if err != nil {
			t.Fatalf("re-decoding an encoded header: %v", err)
		}
		// Encode rewrites the feature table and places the backing
		// name itself; compare everything else.
		h.FeatureNames, h2.FeatureNames = nil, nil
		h.BackingFileOffset, h2.BackingFileOffset = 0, 0
		h.Warnings, h2.Warnings = nil, nil
		if !reflect.DeepEqual(h, h2) {
			t.Fatalf("round trip:\n%+v\n%+v", h, h2)
		}
	})
}
