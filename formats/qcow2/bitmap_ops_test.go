package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// bitmapBits reads a bitmap's bits through this driver.
func bitmapBits(t *testing.T, name, bitmap string) []byte {
	t.Helper()
	img := openImg(t, name, true)
	defer img.Close()
	d, err := img.BitmapData(bitmap)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return d.Bits
}

// TestBitmapWritesMatchQemu writes, zeroes and discards the same ranges
// through qemu-io and through this driver into copies of one image with
// enabled bitmaps of two granularities, and compares the stored bits
// and the flags.
func TestBitmapWritesMatchQemu(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	execOut(t, "qemu-img", "bitmap", "--add", base, "b64k")
	execOut(t, "qemu-img", "bitmap", "--add", "-g", "4k", base, "b4k")
	execOut(t, "qemu-img", "bitmap", "--add", "--disable", base, "off")
	qemuIO(t, base, "write 0 64k")

	type op struct {
		qemu string
		do   func(img *Image) error
	}
	ops := []op{
		{"write -P 1 1M 3k", func(img *Image) error { _, err := img.WriteAt(bytes.Repeat([]byte{1}, 3<<10), 1<<20); return err }},
		{"write -P 1 5000 70000", func(img *Image) error { _, err := img.WriteAt(bytes.Repeat([]byte{1}, 70000), 5000); return err }},
		{"write -z 8M 128k", func(img *Image) error { return img.WriteZeroes(8<<20, 128<<10, false) }},
		{"discard 16M 1M", func(img *Image) error { return img.Discard(16<<20, 1<<20) }},
		{"write -P 1 67104768 4096", func(img *Image) error { _, err := img.WriteAt(bytes.Repeat([]byte{1}, 4096), 64<<20-4096); return err }},
	}
	q := filepath.Join(dir, "q.qcow2")
	g := filepath.Join(dir, "g.qcow2")
	data, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{q, g} {
		if err := os.WriteFile(f, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var cmds []string
	for _, o := range ops {
		cmds = append(cmds, o.qemu)
	}
	qemuIO(t, q, cmds...)
	img := openImg(t, g, false)
	for _, o := range ops {
		if err := o.do(img); err != nil {
			t.Fatalf("%s: %v", o.qemu, err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, g)
	for _, b := range []string{"b64k", "b4k", "off"} {
		if qb, gb := bitmapBits(t, q, b), bitmapBits(t, g, b); !bytes.Equal(qb, gb) {
			t.Errorf("bitmap %s differs at byte %d", b, diffOffset(qb, gb))
		}
	}
	qi := execOut(t, "qemu-img", "info", "-U", q)
	gi := execOut(t, "qemu-img", "info", "-U", g)
	if cut := func(s string) string { return s[bytes.Index([]byte(s), []byte("Format specific")):] }; cut(qi) != cut(gi) {
		t.Errorf("info differs:\nqemu:\n%s\nimgfs:\n%s", qi, gi)
	}
	if !bytes.Equal(rawOf(t, q), rawOf(t, g)) {
		t.Error("guest content differs")
	}
}

// TestBitmapOpsReadByQemu merges bits set by qemu-io through this
// driver and checks that QEMU reads them back: qemu-img convert
// --bitmaps copies the merged bitmap equal to its source.
func TestBitmapOpsReadByQemu(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	f := filepath.Join(dir, "a.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", f, "32M")
	execOut(t, "qemu-img", "bitmap", "--add", "-g", "1k", f, "src")
	qemuIO(t, f, "write 3k 1k", "write 20M 200k")
	img := openImg(t, f, false)
	if err := img.AddBitmap("dst", 0, true); err != nil {
		t.Fatal(err)
	}
	src, err := img.BitmapData("src")
	if err != nil {
		t.Fatal(err)
	}
	if err := img.MergeBitmap("dst", src); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, f)
	out := filepath.Join(dir, "out.qcow2")
	execOut(t, "qemu-img", "convert", "-U", "--bitmaps", "-O", "qcow2", f, out)
	// dst has 64 KiB granularity: the 1 KiB write at 3k dirties cluster
	// 0, the 200 KiB at 20M four clusters.
	want := make([]byte, bitmapBytes(32<<20, 16))
	markRange(want, 16, 3<<10, 1<<10)
	markRange(want, 16, 20<<20, 200<<10)
	if got := bitmapBits(t, out, "dst"); !bytes.Equal(got, want) {
		t.Errorf("merged bitmap as QEMU copied it differs at byte %d", diffOffset(got, want))
	}
	if err := func() error {
		img := openImg(t, f, false)
		defer img.Close()
		return img.RemoveBitmap("src")
	}(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, f)
}

func TestMarkRange(t *testing.T) {
	for _, tc := range []struct {
		gran      uint8
		off, n    int64
		wantFirst uint64
		wantLast  uint64
	}{
		{9, 0, 1, 0, 0},
		{9, 511, 2, 0, 1},
		{16, 65535, 65537, 0, 1},
		{12, 4096 * 9, 4096 * 8, 9, 16},
	} {
		b := make([]byte, 8)
		markRange(b, tc.gran, tc.off, tc.n)
		for i := uint64(0); i < 64; i++ {
			set := b[i/8]&(1<<(i%8)) != 0
			if set != (i >= tc.wantFirst && i <= tc.wantLast) {
				t.Errorf("%+v: bit %d set=%v", tc, i, set)
			}
		}
	}
}
