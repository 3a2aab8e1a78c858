package fs

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// memImage is a formats.Image over a byte slice whose zero sectors are
// holes, enough to drive a layout without files.
type memImage struct {
	formats.Image
	data []byte
}

func (m *memImage) Size() int64 { return int64(len(m.data)) }

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m.data[off:]), nil
}

func (m *memImage) BlockStatus(off, length int64) (formats.Extent, error) {
	zero := func(o int64) bool { return bytes.Count(m.data[o:o+512], []byte{0}) == 512 }
	z := zero(off)
	n := int64(512)
	for n < length && zero(off+n) == z {
		n += 512
	}
	st := formats.StatusData
	if z {
		st = formats.StatusZero
	}
	return formats.Extent{Length: n, Status: st}, nil
}

func TestLayoutReadSeek(t *testing.T) {
	src := &memImage{data: make([]byte, 8192)}
	for i := 1024; i < 2048; i++ {
		src.data[i] = byte(i)
	}
	// File: [0,4) "HEAD", hole, [512,2560) guest [0,2048), hole, [3000,3004) "TAIL"
	l := &layout{size: 4000}
	l.addMem(0, []byte("HEAD"))
	l.addSrc(512, 1024, 0)
	l.addSrc(1536, 1024, 1024) // merges with the previous part
	l.addMem(3000, []byte("TAIL"))
	if _, err := l.finish(); err != nil {
		t.Fatal(err)
	}
	if len(l.parts) != 3 {
		t.Fatalf("parts %+v: want the two source runs merged", l.parts)
	}
	want := make([]byte, 4000)
	copy(want, "HEAD")
	copy(want[512:], src.data[:2048])
	copy(want[3000:], "TAIL")
	for _, tc := range []struct{ off, n int64 }{{0, 4000}, {3, 600}, {1500, 100}, {2990, 2000}, {4000, 10}} {
		buf := make([]byte, tc.n)
		for i := range buf {
			buf[i] = 0xee // must be overwritten, holes too
		}
		k, err := l.readAt(src, buf, tc.off)
		if err != nil {
			t.Fatal(err)
		}
		end := min(tc.off+tc.n, 4000)
		if int64(k) != max(0, end-tc.off) || !bytes.Equal(buf[:k], want[min(tc.off, 4000):end]) {
			t.Errorf("readAt(%d, %d) = %d bytes, wrong content", tc.off, tc.n, k)
		}
	}
	for _, tc := range []struct {
		off  int64
		data bool
		want int64
		err  error
	}{
		{0, true, 0, nil},
		{0, false, 4, nil},
		{4, true, 1536, nil}, // guest [0,1024) is zeroes
		{1536, false, 2560, nil},
		{2560, true, 3000, nil},
		{3004, true, 0, syscall.ENXIO},
		{3004, false, 3004, nil},
		{4000, false, 0, syscall.ENXIO},
	} {
		got, err := l.seek(src, tc.off, tc.data)
		if err != tc.err || err == nil && got != tc.want {
			t.Errorf("seek(%d, data=%v) = %d, %v; want %d, %v", tc.off, tc.data, got, err, tc.want, tc.err)
		}
	}
	if n, err := l.allocated(src); err != nil || n != 4+1024+4 {
		t.Errorf("allocated = %d, %v; want %d", n, err, 4+1024+4)
	}
}

func TestLayoutFinishRejectsOverlap(t *testing.T) {
	for _, tc := range []struct {
		name  string
		parts []part
	}{
		{"overlap", []part{{off: 0, n: 10, mem: make([]byte, 10)}, {off: 5, n: 10, src: 0}}},
		{"past end", []part{{off: 90, n: 20, src: 0}}},
	} {
		l := &layout{size: 100, parts: tc.parts}
		if _, err := l.finish(); err == nil {
			t.Errorf("%s: finish accepted %+v", tc.name, tc.parts)
		}
	}
}

// qemuFormat is the qemu-img format name of each preset.
var qemuFormat = map[string]string{
	"disk.raw": "raw", "disk.stream.vmdk": "vmdk", "disk.qcow2": "qcow2", "disk.compressed.qcow2": "qcow2", "disk.vmdk": "vmdk",
	"disk.vhd": "vpc", "disk.fixed.vhd": "vpc", "disk.vdi": "vdi", "disk.vhdx": "vhdx",
}

// TestPresetsAgainstQemu writes every preset of a qemu-made image with
// scattered data, zero ranges and an unaligned size to a file and has
// qemu-img check and compare it.
func TestPresetsAgainstQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	name := filepath.Join(dir, "src.qcow2")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "5000k")
	formatstest.QemuIO(t, "qcow2", name,
		"write -P 0xab 0 100k", "write -P 0x11 2047k 3k", "write -z 3M 512k", "write -P 0x22 4999k 1k")
	// Random data does not compress: the compressed preset stores it whole.
	rw := formatstest.Open(t, name, formats.OpenOptions{})
	noise := make([]byte, 192<<10)
	rand.NewChaCha8([32]byte{1}).Read(noise)
	if _, err := rw.WriteAt(noise, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	img := formatstest.Open(t, name, formats.OpenOptions{ReadOnly: true})
	defer img.Close()
	for _, p := range presets {
		t.Run(p.name, func(t *testing.T) {
			fmtName, ok := qemuFormat[p.name]
			if !ok {
				t.Fatalf("no qemu format for %s", p.name)
			}
			l, err := p.build(img, img.Size(), t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, p.name)
			buf := make([]byte, l.size)
			if k, err := l.readAt(img, buf, 0); err != nil || int64(k) != l.size {
				t.Fatalf("readAt = %d, %v; want %d", k, err, l.size)
			}
			if p.name == "disk.stream.vmdk" {
				checkGrainMarkers(t, buf)
			}
			if err := os.WriteFile(out, buf, 0o644); err != nil {
				t.Fatal(err)
			}
			if fmtName != "raw" && fmtName != "vpc" { // qemu cannot check these
				if b, err := exec.Command("qemu-img", "check", "-f", fmtName, out).CombinedOutput(); err != nil ||
					!strings.Contains(string(b), "No errors were found") {
					t.Errorf("qemu-img check: %v\n%s", err, b)
				} else if compressed := !strings.Contains(string(b), " 0.00% compressed"); fmtName == "qcow2" && compressed != strings.Contains(p.name, "compressed") {
					t.Errorf("qemu-img check finds compressed clusters: %v\n%s", compressed, b)
				}
			}
			b, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", fmtName, name, out).CombinedOutput()
			if err != nil || !strings.Contains(string(b), "Images are identical.") {
				t.Errorf("qemu-img compare: %v\n%s", err, b)
			}
		})
	}
}

// checkGrainMarkers checks that each grain a streamOptimized image's
// tables point to starts with a marker naming that grain's sector, which
// qemu ignores but VMware's importers go by.
func checkGrainMarkers(t *testing.T, img []byte) {
	t.Helper()
	le := binary.LittleEndian
	grain := int64(le.Uint64(img[20:]))
	perGT := int64(le.Uint32(img[44:]))
	gd := int64(le.Uint64(img[56:])) * 512
	grains := (int64(le.Uint64(img[12:])) + grain - 1) / grain
	found := 0
	for g := int64(0); g < grains; g++ {
		gt := int64(le.Uint32(img[gd+g/perGT*4:])) * 512
		sector := int64(le.Uint32(img[gt+g%perGT*4:]))
		if sector == 0 {
			continue
		}
		found++
		if lba := int64(le.Uint64(img[sector*512:])); lba != g*grain {
			t.Errorf("grain %d: marker names sector %d, want %d", g, lba, g*grain)
		}
	}
	if found == 0 {
		t.Error("no grains allocated")
	}
}
