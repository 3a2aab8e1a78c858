package control

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	_ "github.com/imgfs/imgfs/formats/raw"
)

// noWrites is a raw target whose WriteAt fails, so only copy offloading
// (HostMap + copy_file_range) can fill it.
type noWrites struct{ formats.Image }

func (noWrites) WriteAt([]byte, int64) (int, error) { return 0, errors.New("write through memory") }

func (w noWrites) HostMap(off, n int64) (*formats.File, int64, int64, bool) {
	return w.Image.(formats.HostMapper).HostMap(off, n)
}

func TestConvertCopyOffload(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte("offload!"), 1<<17) // 1 MiB
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, make([]byte, len(data)), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := formats.Open(src, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	for _, copyWhole := range []bool{true, false} {
		err := Convert(context.Background(), ConvertOptions{
			Sources: []formats.Image{in}, Target: dst, TargetFormat: "raw", SkipCreate: true,
			SparseSize: DefaultSparseSize, Workers: 2, CopyWhole: copyWhole,
			OpenTarget: func(CacheMode) (formats.Image, error) {
				img, err := formats.Open(dst, formats.OpenOptions{Format: "raw"})
				return noWrites{img}, err
			},
		})
		if copyWhole && err != nil {
			t.Fatalf("-C: %v", err)
		}
		if !copyWhole && err == nil {
			t.Fatal("without -C the data went around WriteAt")
		}
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("offloaded copy differs (%v)", err)
	}
}

// plainTarget hides every capability of the image it wraps, such as
// Zeroer, so convert writes zeroes through WriteAt.
type plainTarget struct{ formats.Image }

// TestConvertZeroesBetweenData: with -n into a target that cannot write
// zeroes itself, a zero run in the middle of a chunk is written without
// disturbing the data after it in the same chunk.
func TestConvertZeroesBetweenData(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i%251) + 1
	}
	clear(data[256<<10 : 768<<10]) // a zero run inside one chunk
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, bytes.Repeat([]byte{0xff}, len(data)), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := formats.Open(src, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	err = Convert(context.Background(), ConvertOptions{
		Sources: []formats.Image{in}, Target: dst, TargetFormat: "raw", SkipCreate: true,
		SparseSize: DefaultSparseSize, Workers: 1,
		OpenTarget: func(CacheMode) (formats.Image, error) {
			img, err := formats.Open(dst, formats.OpenOptions{Format: "raw"})
			return plainTarget{img}, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != data[i] {
			t.Fatalf("target differs from the source at byte %d", i)
		}
	}
}
