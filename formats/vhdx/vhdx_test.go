package vhdx

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

func TestConformance(t *testing.T) {
	for _, opts := range []string{
		"subformat=dynamic,block_size=1M",
		"subformat=fixed,block_size=1M",
		"subformat=fixed,block_state_zero=off,block_size=1M",
	} {
		t.Run(opts, func(t *testing.T) { formatstest.Run(t, formatstest.Created("vhdx", opts)) })
	}
}

func TestProbe(t *testing.T) {
	for _, tc := range []struct {
		buf  []byte
		want int
	}{
		{[]byte("vhdxfile\x51\x00"), 100},
		{[]byte("vhdxfil"), 0},
		{[]byte("VHDXFILE"), 0},
		{nil, 0},
	} {
		if got := probe(tc.buf, "x"); got != tc.want {
			t.Errorf("probe(%q) = %d, want %d", tc.buf, got, tc.want)
		}
	}
}

// qemuImages are the creation options and qemu-io commands of the images
// the differential read tests build with QEMU.
var qemuImages = []struct {
	name, opts string
	size       string
	cmds       []string
}{
	{"dynamic", "subformat=dynamic", "40M", []string{"write -P 0x11 0 64k", "write -P 0x22 9M 3M", "write -z 10M 512k", "write -P 0x33 39M 1M"}},
	{"fixed", "subformat=fixed,block_size=1M", "6M", []string{"write -P 0x44 1M 1536k", "write -z 2M 4k"}},
	{"fixed-nonzero", "subformat=fixed,block_state_zero=off", "16M", []string{"write -P 0x55 12345k 7k"}},
	{"bs1m-nozero", "block_size=1M,block_state_zero=off", "5M", []string{"write -P 0x66 512 1k", "write -P 0x67 4M 1M"}},
	{"bs32m", "block_size=32M,log_size=2M", "70M", []string{"write -P 0x77 31M 2M", "write -z 40M 1M"}},
}

func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, tc := range qemuImages {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "q.vhdx")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", tc.opts, name, tc.size)
			formatstest.QemuIO(t, "vhdx", name, tc.cmds...)
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "vhdx", name)
		})
	}
}

// fillRandom returns n random bytes.
func fillRandom(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestWrittenImagesPassQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, tc := range []struct {
		opts string
		size int64
	}{
		{"subformat=dynamic", 40 << 20},
		{"subformat=fixed,block_size=1M", 9 << 20},
		{"block_state_zero=off,block_size=1M", 5 << 30},
		{"block_size=32M,log_size=3M", 100 << 20},
	} {
		t.Run(tc.opts, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "w.vhdx")
			if err := formatstest.Create(t, "vhdx", name, tc.opts+",size="+strconv.FormatInt(tc.size, 10)); err != nil {
				t.Fatal(err)
			}
			img := formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx"})
			rng := rand.New(rand.NewPCG(uint64(tc.size), 3))
			type piece struct {
				off int64
				buf []byte
			}
			var writes []piece
			for _, w := range []struct{ off, n int64 }{
				{0, 4096},
				{1<<20 - 100, 3 << 20}, // several blocks in one write
				{tc.size - 1000, 1000},
				{tc.size / 2, 77},
				{tc.size/2 + 5000, 512},
				{4097<<20 + 12345, 8192}, // past the first sector bitmap entry
			} {
				if w.off+w.n > tc.size {
					continue
				}
				buf := fillRandom(rng, int(w.n))
				if _, err := img.WriteAt(buf, w.off); err != nil {
					t.Fatalf("WriteAt(%d, %d): %v", w.n, w.off, err)
				}
				writes = append(writes, piece{w.off, buf})
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, name)
			// QEMU reads what we wrote: a window around each write,
			// through qemu-img dd, so that large images stay cheap.
			for _, w := range writes {
				lo := max(w.off/4096*4096-4096, 0)
				hi := min((w.off+int64(len(w.buf))+4095)/4096*4096+4096, tc.size)
				want := make([]byte, hi-lo)
				for _, o := range writes {
					if o.off < hi && o.off+int64(len(o.buf)) > lo {
						s, e := max(o.off, lo), min(o.off+int64(len(o.buf)), hi)
						copy(want[s-lo:e-lo], o.buf[s-o.off:e-o.off])
					}
				}
				if i := formatstest.FirstDiff(qemuWindow(t, name, lo, hi-lo), want); i >= 0 {
					t.Fatalf("qemu reads a different byte at %d", lo+int64(i))
				}
			}
		})
	}
}

// qemuWindow reads [off, off+n) of a vhdx image (off and n multiples of
// 4 KiB) through qemu-img dd. qemu-img 7.2's dd ends at input block
// count, counting the skipped blocks too.
func qemuWindow(t *testing.T, name string, off, n int64) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "window")
	formatstest.Exec(t, "qemu-img", "dd", "-U", "-f", "vhdx", "-O", "raw", "bs=4096", "if="+name, "of="+out,
		"skip="+strconv.FormatInt(off/4096, 10), "count="+strconv.FormatInt((off+n)/4096, 10))
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stderrOf runs a command expected to fail and returns its stderr's
// first line without the "qemu-img: " prefix.
func stderrOf(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatalf("%s %q succeeded", name, args)
	}
	return strings.TrimPrefix(strings.TrimSuffix(stderr.String(), "\n"), "qemu-img: ")
}

func TestCreateErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range []string{
		"block_size=3M",
		"subformat=foo",
		"log_size=18446744073709551615",
		"log_size=5G",
		"preallocation=foo",
		"extent_size_hint=8G",
		"size=100T",
	} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			qname, name := filepath.Join(dir, "q.vhdx"), filepath.Join(dir, "o.vhdx")
			size := "1M"
			if strings.HasPrefix(opts, "size=") {
				size = ""
			}
			args := []string{"create", "-q", "-f", "vhdx", "-o", opts, qname}
			if size != "" {
				args = append(args, size)
			}
			want := strings.TrimPrefix(stderrOf(t, "qemu-img", args...), qname+": ")
			o := opts
			if size != "" {
				o += ",size=" + size
			}
			err := formatstest.Create(t, "vhdx", name, o)
			if err == nil || err.Error() != want {
				t.Errorf("create -o %s: %v, want %q", opts, err, want)
			}
			_, qerr := os.Stat(qname)
			_, oerr := os.Stat(name)
			if (qerr == nil) != (oerr == nil) {
				t.Errorf("file left behind: qemu %v, ours %v", qerr, oerr)
			}
		})
	}
}

// TestCreateLayout compares the structures of images we create with
// QEMU's: everything but the random GUIDs, sequence numbers, checksums
// of the headers, and the creator string is the same.
func TestCreateLayout(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, tc := range []struct{ opts, size string }{
		{"", "100M"},
		{"subformat=fixed,block_size=1M", "3M"},
		{"block_state_zero=off", "2G"},
		{"log_size=100,block_size=512M", "300M"},
		{"block_size=1M", "1000"},
		{"", "0"},
	} {
		t.Run(tc.opts+"/"+tc.size, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			qname, name := filepath.Join(dir, "q.vhdx"), filepath.Join(dir, "o.vhdx")
			args := []string{"create", "-q", "-f", "vhdx", qname, tc.size}
			o := "size=" + tc.size
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
				o = tc.opts + "," + o
			}
			formatstest.Exec(t, "qemu-img", args...)
			if err := formatstest.Create(t, "vhdx", name, o); err != nil {
				t.Fatal(err)
			}
			q, err := os.ReadFile(qname)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			if len(q) != len(b) {
				t.Fatalf("file size %d, qemu %d", len(b), len(q))
			}
			if !bytes.Equal(b[:8], q[:8]) {
				t.Errorf("file identifier %q, qemu %q", b[:8], q[:8])
			}
			for _, off := range []int{header1Offset, header2Offset} {
				hb, hq := decodeHeader(b[off:]), decodeHeader(q[off:])
				if !headerValid(b[off:]) {
					t.Errorf("header at %d invalid", off)
				}
				if hb.LogGUID != hq.LogGUID || hb.LogLength != hq.LogLength || hb.LogOffset != hq.LogOffset ||
					hb.Version != hq.Version || hb.LogVersion != hq.LogVersion {
					t.Errorf("header at %d: %+v, qemu %+v", off, hb, hq)
				}
			}
			if diff := formatstest.FirstDiff(b[headerBlockSize*3:headerSectionEnd], q[headerBlockSize*3:headerSectionEnd]); diff >= 0 {
				t.Errorf("region tables differ at %d", headerBlockSize*3+diff)
			}
			// Everything from the log on, except the page 83 GUID.
			rt := decodeRegionEntry(b[regionTable1+16+regionEntryLen:])
			page83 := int(rt.FileOffset) + headerBlockSize + 16
			copy(b[page83:page83+16], q[page83:page83+16])
			if diff := formatstest.FirstDiff(b[headerSectionEnd:], q[headerSectionEnd:]); diff >= 0 {
				t.Errorf("files differ at %d", headerSectionEnd+diff)
			}
		})
	}
}

// TestLogicalSector4096 reads and writes an image with 4 KiB logical
// sectors, which QEMU cannot create: ours, with the sector size item
// patched (the BAT layout of so small an image does not change).
func TestLogicalSector4096(t *testing.T) {
	name := filepath.Join(t.TempDir(), "4k.vhdx")
	if err := formatstest.Create(t, "vhdx", name, "size=8M,block_size=1M"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0x10, 0, 0}, 3*miB+headerBlockSize+32); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx"})
	if got := img.(*Image).logicalSector; got != 4096 {
		t.Fatalf("logical sector size %d", got)
	}
	want := fillRandom(rand.New(rand.NewPCG(4, 4096)), 3<<20)
	if _, err := img.WriteAt(want, 1<<20+4096*3+5); err != nil {
		t.Fatal(err)
	}
	img.Close()
	img = formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
	defer img.Close()
	got := formatstest.ReadAll(t, img)
	if i := formatstest.FirstDiff(got[1<<20+4096*3+5:][:len(want)], want); i >= 0 {
		t.Fatalf("byte %d differs after reopen", i)
	}
}

// mustBeClean fails the test unless qemu-img check finds the image clean.
func mustBeClean(t testing.TB, name string) {
	t.Helper()
	out := formatstest.Exec(t, "qemu-img", "check", "-U", "-f", "vhdx", name)
	if !strings.Contains(out, "No errors were found on the image.") {
		t.Fatalf("qemu-img check %s:\n%s", name, out)
	}
}
