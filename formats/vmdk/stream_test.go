package vmdk_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

var errInvalid = syscall.EINVAL

// TestStreamWrites: a streamOptimized image takes whole grains once,
// compressed, and refuses partial grains and rewrites as QEMU does;
// what it holds reads back through qemu-img.
func TestStreamWrites(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	const size = 5*65536 + 1024
	name := filepath.Join(dir, "s.vmdk")
	img := created(t, name, "subformat=streamOptimized", size)
	want := make([]byte, size)
	write := func(off int64, data []byte) error {
		_, err := img.WriteAt(data, off)
		if err == nil {
			copy(want[off:], data)
		}
		return err
	}
	if err := write(0, pattern(2*65536, 1)); err != nil {
		t.Fatal(err)
	}
	if err := write(4*65536, pattern(65536+1024, 2)); err != nil { // to the end, with the short last grain
		t.Fatal(err)
	}
	if err := write(65536, pattern(65536, 3)); err == nil {
		t.Errorf("rewriting a grain succeeded")
	}
	if err := write(2*65536+512, pattern(512, 4)); err == nil {
		t.Errorf("writing part of a grain succeeded")
	}
	cw := img.(formats.CompressedWriter)
	if u := cw.CompressionUnit(); u != 65536 {
		t.Errorf("CompressionUnit = %d", u)
	}
	g := bytes.Repeat([]byte("vmdk"), 65536/4)
	z, ok := cw.Compress(nil, g)
	if !ok {
		t.Fatal("Compress refused a grain of a stream image")
	}
	if err := cw.WriteCompressed(3*65536, z); err != nil {
		t.Fatal(err)
	}
	copy(want[3*65536:], g)
	if e, err := img.BlockStatus(0, size); err != nil || e.Status != formats.StatusData|formats.StatusCompressed || e.Length != 65536 {
		t.Errorf("BlockStatus(0) = %+v, %v", e, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	formatstest.Exec(t, "qemu-img", "check", filepath.Join(dir, "s.vmdk"))
	formatstest.Exec(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", filepath.Join(dir, "s.vmdk"), filepath.Join(dir, "want.raw"))
	if got := formatstest.ReadAll(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vmdk", ReadOnly: true})); !bytes.Equal(got, want) {
		t.Errorf("stream image reads back differently")
	}
	formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "s.vmdk"))
}

// TestConvertCompressedToSparse: convert -c to a monolithicSparse image
// stores the data plainly, as QEMU does for uncompressed extents.
func TestCompressToSparse(t *testing.T) {
	dir := t.TempDir()
	img := created(t, filepath.Join(dir, "m.vmdk"), "subformat=monolithicSparse", 1<<20)
	defer img.Close()
	cw := img.(formats.CompressedWriter)
	if _, ok := cw.Compress(nil, make([]byte, 65536)); ok {
		t.Errorf("Compress on a monolithicSparse image returned compressed data")
	}
	if n := cw.CompressionUnit(); n != 65536 {
		t.Errorf("CompressionUnit = %d", n)
	}
}

// TestStreamFooter reads a stream-optimized image in VMware's layout,
// with the grain directory given by a footer at the end of the file (the
// header says "at end"), as qemu-img reads it.
func TestStreamFooter(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	data := append(pattern(3*65536, 9), make([]byte, 65536+512)...)
	if err := os.WriteFile(filepath.Join(dir, "src.raw"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	formatstest.Exec(t, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", filepath.Join(dir, "src.raw"), filepath.Join(dir, "s.vmdk"))
	b, err := os.ReadFile(filepath.Join(dir, "s.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	footer := make([]byte, 3*512)
	binary.LittleEndian.PutUint32(footer[12:], 3) // footer marker
	copy(footer[512:], b[:512])                   // the header, with the real directory offset
	for i := 56; i < 64; i++ {
		b[i] = 0xff // the header's directory offset: "in the footer"
	}
	b = append(b, footer...)
	if err := os.WriteFile(filepath.Join(dir, "s.vmdk"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(dir, "s.vmdk")
	if got := formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vmdk", ReadOnly: true})); !bytes.Equal(got, data) {
		t.Errorf("footer image reads differently from the source")
	}
	formatstest.SameInfoAndMap(t, "vmdk", name)
	// A broken footer is refused, as QEMU refuses it.
	b[len(b)-3*512+12] = 2
	os.WriteFile(name, b, 0o644)
	if img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk", ReadOnly: true}); err == nil {
		img.Close()
		t.Errorf("opened an image with an invalid footer")
	} else if err.Error() != "Invalid footer" {
		t.Errorf("invalid footer: %v", err)
	}
}
