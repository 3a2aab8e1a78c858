package tests

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// fuseFormat is one image of TestFUSEFormats: a format, its creation
// options and the file it lives in.
type fuseFormat struct {
	file, format, opts string
	// stream: a streamOptimized VMDK, which takes whole grains only,
	// each written once (QEMU's rule, and the driver's).
	stream bool
}

// fuseFormats are the writable formats and subformats the mount serves.
var fuseFormats = []fuseFormat{
	{file: "t.img", format: "raw"},
	{file: "t.qcow2", format: "qcow2"},
	{file: "t.qcow", format: "qcow"},
	{file: "t.qed", format: "qed"},
	{file: "sparse.vmdk", format: "vmdk", opts: "subformat=monolithicSparse"},
	{file: "flat.vmdk", format: "vmdk", opts: "subformat=monolithicFlat"},
	{file: "twogb.vmdk", format: "vmdk", opts: "subformat=twoGbMaxExtentSparse"},
	{file: "stream.vmdk", format: "vmdk", opts: "subformat=streamOptimized", stream: true},
	{file: "dynamic.vdi", format: "vdi", opts: "static=off"},
	{file: "static.vdi", format: "vdi", opts: "static=on"},
	{file: "dynamic.vhd", format: "vpc", opts: "subformat=dynamic"},
	{file: "fixed.vhd", format: "vpc", opts: "subformat=fixed"},
	{file: "dynamic.vhdx", format: "vhdx", opts: "subformat=dynamic"},
	{file: "fixed.vhdx", format: "vhdx", opts: "subformat=fixed"},
	{file: "t.parallels", format: "parallels"},
	{file: "t.luks", format: "luks", opts: lukskey},
}

// fuseFormatSize is every image's virtual size: a whole number of
// 64 KiB grains, so the stream image's last grain is a whole one.
const fuseFormatSize = 4 * mib

// fuseKey is the LUKS image's passphrase, as secretObject defines it.
const fuseKey = "imgfs"

func (f fuseFormat) image() image { return image{f.format, f.file} }

// createArgs is the qemu-img create command line.
func (f fuseFormat) createArgs() []string {
	args := []string{"create", "-q", "-f", f.format}
	if f.format == "luks" {
		args = append(args, "--object", secretObject)
	}
	if f.opts != "" {
		args = append(args, "-o", f.opts)
	}
	return append(args, f.file, strconv.FormatInt(fuseFormatSize, 10))
}

// diskOp is one change made through disk, and made to the shadow too.
type diskOp struct {
	kind    string // "write", "punch", "zero"
	off, n  int64
	pattern byte
}

// generalOps change an image of fuseFormatSize bytes at scattered,
// partly unaligned offsets: over the data qemu-io put there and into
// unallocated clusters, across cluster boundaries, the last byte, and
// discards aligned and not.
var generalOps = []diskOp{
	{"write", 10, 100, 0x21},
	{"write", 64*kib + 512, 4096, 0x22},
	{"write", 3*64*kib - 1000, 3000, 0x23},
	{"write", mib + 7, 100000, 0x24},
	{"write", 2 * mib, 256 * kib, 0x25},
	{"punch", 2*mib + 100, 5000, 0},
	{"punch", 2*mib + 64*kib, 64 * kib, 0},
	{"zero", mib + 50000, 10000, 0},
	{"punch", 3 * mib, 128 * kib, 0},
	{"write", fuseFormatSize - 70000, 70000, 0x26},
}

// streamOps are what a streamOptimized image accepts: whole grains not
// written before (qemu-io wrote the first one).
var streamOps = []diskOp{
	{"write", 128 * kib, 64 * kib, 0x31},
	{"write", mib, 128 * kib, 0x32},
	// A zero range over grains never written stores zero grains.
	{"punch", 2 * mib, 64 * kib, 0},
	{"write", fuseFormatSize - 64*kib, 64 * kib, 0x33},
}

// applyOp makes op on the open disk and on the shadow.
func applyOp(t *testing.T, f *os.File, shadow []byte, op diskOp) {
	t.Helper()
	var err error
	switch op.kind {
	case "write":
		buf := bytes.Repeat([]byte{op.pattern}, int(op.n))
		_, err = f.WriteAt(buf, op.off)
		copy(shadow[op.off:], buf)
	case "punch":
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, op.off, op.n)
		clear(shadow[op.off : op.off+op.n])
	case "zero":
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, op.off, op.n)
		clear(shadow[op.off : op.off+op.n])
	}
	if err != nil {
		t.Fatalf("%s %d+%d: %v", op.kind, op.off, op.n, err)
	}
}

// resizes reports whether `imgfs resize` grows a copy of the image.
func resizes(t *testing.T, src string, f fuseFormat) bool {
	t.Helper()
	dir := t.TempDir()
	// The image's files: its own and its extents ("twogb-s001.vmdk").
	stem := strings.TrimSuffix(f.file, filepath.Ext(f.file))
	for _, name := range listDir(t, src) {
		if name == f.file || strings.HasPrefix(name, stem+"-") {
			b, err := os.ReadFile(filepath.Join(src, name))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	args := []string{"resize", "-q"}
	if f.format == "luks" {
		args = append(args, "--object", secretObject, "--image-opts", f.image().opts())
	} else {
		args = append(args, "-f", f.format, f.file)
	}
	return run(t, dir, ours, append(args, "+1M")...).code == 0
}

// TestFUSEFormats writes through the disk file of an image of every
// writable format, with pwrite, fallocate and (where the format can
// grow) truncate, and holds the result to a raw shadow file that got
// the same changes: qemu-img compare finds them identical and qemu-img
// check finds the image clean after the unmount.
func TestFUSEFormats(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	for _, f := range fuseFormats {
		// runQemuImg: creating a LUKS image may need a second try.
		if r := runQemuImg(t, src, f.createArgs()...); r.code != 0 {
			t.Fatalf("qemu-img %s: exit %d\n%s", strings.Join(f.createArgs(), " "), r.code, r.stderr)
		}
		ops := []string{"write -P 0x11 0 64k"}
		if !f.stream {
			ops = append(ops, "write -P 0x12 1M 256k", "write -P 0x13 3M 64k")
		}
		qemuIOImage(t, src, f.image(), ops)
	}
	// The shadows start as qemu-img reads the images, and whether the
	// image can grow is what `imgfs resize` says, checked against
	// qemu-img resize by the command's own tests.
	shadows := map[string][]byte{}
	grows := map[string]bool{}
	for _, f := range fuseFormats {
		out := filepath.Join(t.TempDir(), "shadow")
		args := []string{"convert", "-O", "raw"}
		if f.format == "luks" {
			args = append(args, "--object", secretObject, "--image-opts", f.image().opts())
		} else {
			args = append(args, "-f", f.format, f.file)
		}
		mustRun(t, src, qemuImg, append(args, out)...)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		shadows[f.file] = b
		grows[f.file] = resizes(t, src, f)
	}
	// LUKS grows as qemu-img resize grows it; through disk the grown
	// range must read as zeroes all the same, not as the noise its new
	// sectors decrypt to.
	if !grows["t.luks"] {
		t.Errorf("imgfs resize does not grow t.luks")
	}
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(fuseKey), 0o600); err != nil {
		t.Fatal(err)
	}
	mnt := mountImgfs(t, src, "key_file="+keyFile)
	// The extent files of the split VMDKs are parts of those images,
	// not images of their own.
	var want []string
	for _, f := range fuseFormats {
		want = append(want, f.file)
	}
	slices.Sort(want)
	if got := readDirNames(t, mnt); !slices.Equal(got, want) {
		t.Errorf("the mount lists %q, want %q", got, want)
	}
	if _, err := os.Stat(filepath.Join(mnt, "twogb-s001.vmdk")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an extent of twogb.vmdk: %v, want ENOENT", err)
	}
	for _, f := range fuseFormats {
		t.Run(f.file, func(t *testing.T) {
			shadow := shadows[f.file]
			disk := filepath.Join(mnt, f.file, "disk")
			fd, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer fd.Close()
			ops := generalOps
			if f.stream {
				ops = streamOps
			}
			for _, op := range ops {
				applyOp(t, fd, shadow, op)
			}
			if f.stream {
				// A grain written already, and a partial grain.
				if _, err := fd.WriteAt(make([]byte, 64*kib), 0); !errors.Is(err, unix.EIO) {
					t.Errorf("rewriting a stream grain: %v, want EIO", err)
				}
				if _, err := fd.WriteAt(make([]byte, 4096), 3*mib+512); !errors.Is(err, unix.EINVAL) {
					t.Errorf("a partial stream grain: %v, want EINVAL", err)
				}
			}
			size := int64(len(shadow))
			err = fd.Truncate(size + mib)
			switch {
			case grows[f.file] && err != nil:
				t.Errorf("truncate to grow: %v; imgfs resize grows it", err)
			case !grows[f.file] && !errors.Is(err, unix.EOPNOTSUPP):
				t.Errorf("truncate to grow: %v, want EOPNOTSUPP as imgfs resize cannot", err)
			case err == nil:
				shadow = append(shadow, make([]byte, mib)...)
				applyOp(t, fd, shadow, diskOp{"write", size + 512*kib, 8192, 0x27})
			}
			if err := fd.Sync(); err != nil {
				t.Errorf("fsync: %v", err)
			}
			got, err := os.ReadFile(disk)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, shadow) {
				t.Errorf("disk differs from the shadow (%d, %d bytes) at byte %d", len(got), len(shadow), firstByteDiff(got, shadow))
			}
			shadows[f.file] = shadow
		})
	}
	umountImgfs(t, mnt)

	// Without the passphrase, or with a wrong one, the LUKS image is
	// listed and described but its data is EACCES.
	wrongKey := filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(wrongKey, []byte(fuseKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, opts := range [][]string{nil, {"key_file=" + wrongKey}} {
		m := mountImgfs(t, src, opts...)
		if info, err := os.ReadFile(filepath.Join(m, "t.luks", "info")); err != nil || !strings.Contains(string(info), "file format: luks") {
			t.Errorf("-o %q: t.luks/info: %q, %v", opts, info, err)
		}
		if _, err := os.ReadFile(filepath.Join(m, "t.luks", "disk")); !errors.Is(err, unix.EACCES) {
			t.Errorf("-o %q: reading t.luks/disk: %v, want EACCES", opts, err)
		}
		umountImgfs(t, m)
	}

	for _, f := range fuseFormats {
		t.Run(f.file+"/qemu-img", func(t *testing.T) {
			shadow := filepath.Join(t.TempDir(), "shadow.raw")
			if err := os.WriteFile(shadow, shadows[f.file], 0o644); err != nil {
				t.Fatal(err)
			}
			img := f.image()
			if r := run(t, src, qemuImg, compareArgs(image{"raw", shadow}, img)...); r.code != 0 {
				t.Errorf("qemu-img compare with the shadow: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			r := run(t, src, qemuImg, append([]string{"check"}, img.args()...)...)
			if r.code != 0 && !strings.Contains(r.stderr, "does not support checks") {
				t.Errorf("qemu-img check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
		})
	}
}

// cloopImage is a cloop image of three 4 KiB blocks (the layout of
// block/cloop.c: header, block count, offsets, zlib streams).
func cloopImage() []byte {
	const bs = 4096
	var out, data bytes.Buffer
	out.WriteString("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
	out.Write(make([]byte, 128-out.Len()))
	binary.Write(&out, binary.BigEndian, uint32(bs))
	binary.Write(&out, binary.BigEndian, uint32(3))
	base := uint64(128 + 8 + 8*4)
	for i := range 3 {
		binary.Write(&out, binary.BigEndian, base+uint64(data.Len()))
		zw := zlib.NewWriter(&data)
		zw.Write(bytes.Repeat([]byte{byte(i + 1)}, bs))
		zw.Close()
	}
	binary.Write(&out, binary.BigEndian, base+uint64(data.Len()))
	out.Write(data.Bytes())
	return out.Bytes()
}

// bochsImage is a Bochs growing image of 8 KiB: two 4 KiB extents, the
// first stored, the second unallocated (the layout of block/bochs.c).
func bochsImage() []byte {
	h := make([]byte, 512)
	copy(h, "Bochs Virtual HD Image")
	copy(h[32:], "Redolog")
	copy(h[48:], "Growing")
	le := binary.LittleEndian
	le.PutUint32(h[64:], 0x00020000) // version
	le.PutUint32(h[68:], 512)        // header size
	le.PutUint32(h[72:], 2)          // catalog entries
	le.PutUint32(h[76:], 1)          // bitmap size, sectors
	le.PutUint32(h[80:], 4096)       // extent size
	le.PutUint64(h[88:], 8192)       // disk size
	out := bytes.NewBuffer(h)
	binary.Write(out, le, []uint32{0, 0xffffffff})
	out.Write(make([]byte, 512-8)) // the catalog takes a sector
	bm := make([]byte, 512)
	bm[0] = 0xff
	out.Write(bm)
	out.Write(bytes.Repeat([]byte{0x42}, 4096))
	return out.Bytes()
}

// dmgImage is a DMG of 4 KiB in one raw chunk, its block table (mish)
// in a resource fork, and the koly trailer (the layout block/dmg.c reads).
func dmgImage() []byte {
	be := binary.BigEndian
	data := bytes.Repeat([]byte{0x5d}, 4096)
	mish := make([]byte, 204)
	be.PutUint32(mish, 0x6d697368) // "mish"
	be.PutUint32(mish[4:], 1)
	be.PutUint64(mish[16:], 8) // sectors
	entry := func(typ uint32, sector, sectors, off, n uint64) {
		e := make([]byte, 40)
		be.PutUint32(e, typ)
		be.PutUint64(e[8:], sector)
		be.PutUint64(e[16:], sectors)
		be.PutUint64(e[24:], off)
		be.PutUint64(e[32:], n)
		mish = append(mish, e...)
	}
	entry(1, 0, 8, 0, uint64(len(data))) // raw
	entry(0xffffffff, 8, 0, 0, 0)        // end
	be.PutUint32(mish[200:], 2)
	fork := make([]byte, 0x100)
	be.PutUint32(fork, 0x100)
	be.PutUint32(fork[4:], uint32(0x100+4+len(mish)))
	be.PutUint32(fork[8:], uint32(4+len(mish)))
	fork = be.AppendUint32(fork, uint32(len(mish)))
	fork = append(fork, mish...)
	koly := make([]byte, 512)
	be.PutUint32(koly, 0x6b6f6c79) // "koly"
	be.PutUint32(koly[4:], 4)
	be.PutUint32(koly[8:], 512)
	be.PutUint64(koly[0x20:], uint64(len(data)))
	be.PutUint64(koly[0x28:], uint64(len(data)))
	be.PutUint64(koly[0x30:], uint64(len(fork)))
	be.PutUint64(koly[0x1ec:], 8)
	return append(append(data, fork...), koly...)
}

// TestFUSEReadOnlyFormats: images of the formats imgfs only reads are
// served, and every change through the mount fails with EROFS.
func TestFUSEReadOnlyFormats(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	images := map[string][]byte{"a.cloop": cloopImage(), "b.bochs": bochsImage(), "c.dmg": dmgImage()}
	for name, data := range images {
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mnt := mountImgfs(t, src)
	if got := readDirNames(t, mnt); !slices.Equal(got, []string{"a.cloop", "b.bochs", "c.dmg"}) {
		t.Errorf("the mount lists %q", got)
	}
	for _, name := range []string{"a.cloop", "b.bochs", "c.dmg"} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(mnt, name)
			disk := filepath.Join(dir, "disk")
			got, err := os.ReadFile(disk)
			if err != nil {
				t.Fatal(err)
			}
			if want := convertRaw(t, src, name); !bytes.Equal(got, want) {
				t.Errorf("disk differs from qemu-img convert at byte %d", firstByteDiff(got, want))
			}
			if st, err := os.Stat(disk); err != nil || st.Mode().Perm() != 0o444 {
				t.Errorf("disk: %v, %v; want mode 0444", st, err)
			}
			if _, err := os.OpenFile(disk, os.O_RDWR, 0); !errors.Is(err, unix.EROFS) {
				t.Errorf("open disk for writing: %v, want EROFS", err)
			}
			if err := os.Truncate(disk, 1<<20); !errors.Is(err, unix.EROFS) {
				t.Errorf("truncate disk: %v, want EROFS", err)
			}
			if err := writeCtl(t, dir, "resize +1M"); !errors.Is(err, unix.EROFS) {
				t.Errorf("ctl resize: %v, want EROFS", err)
			}
		})
	}
}
