package vmdk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// Differential tests against QEMU 7.2's qemu-img and qemu-io.

func needQemu(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// run runs a tool in dir and returns its standard output.
func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// readAll reads every guest byte of an image through our driver.
func readAll(t *testing.T, name string) []byte {
	t.Helper()
	img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer img.Close()
	buf := make([]byte, img.Size())
	if n, err := img.ReadAt(buf, 0); n != len(buf) {
		t.Fatalf("ReadAt %s: %d, %v", name, n, err)
	}
	return buf
}

// qemuRaw is the image's content as qemu-img convert -O raw sees it.
func qemuRaw(t *testing.T, dir, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, dir, "qemu-img", "convert", "-f", "vmdk", "-O", "raw", name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// info renders what imgfs info prints, human and JSON.
func info(t *testing.T, name string) (string, string) {
	t.Helper()
	list, err := control.Info(control.InfoOptions{Filename: name, Open: func(f, format string) (formats.Image, error) {
		return formats.Open(f, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true, NoBacking: true})
	}})
	if err != nil {
		t.Fatalf("info %s: %v", name, err)
	}
	return list.Human(), list.JSON()
}

// qemuIO are the writes made to images before reading them back: data
// across grains and extents' ends, a partial grain, zeroes.
var qemuIO = []string{
	"write -P 0x11 0 4k",
	"write -P 0x22 60k 8k",
	"write -P 0x33 1M 128k",
	"write -P 0x44 3M 512",
	"write -z 1M 64k",
}

func TestReadQemuImages(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct{ name, opts string }{
		{"sparse", "subformat=monolithicSparse"},
		{"zeroed", "subformat=monolithicSparse,zeroed_grain=on"},
		{"flat", "subformat=monolithicFlat"},
		{"split-sparse", "subformat=twoGbMaxExtentSparse"},
		{"split-flat", "subformat=twoGbMaxExtentFlat"},
		{"scsi", "adapter_type=lsilogic,compat6=on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			run(t, dir, "qemu-img", "create", "-f", "vmdk", "-o", tc.opts, "img.vmdk", "5000k")
			args := []string{"-f", "vmdk"}
			for _, c := range qemuIO {
				args = append(args, "-c", c)
			}
			run(t, dir, "qemu-io", append(args, "img.vmdk")...)
			name := filepath.Join(dir, "img.vmdk")
			if got, want := readAll(t, name), qemuRaw(t, dir, "img.vmdk"); !bytes.Equal(got, want) {
				t.Errorf("content differs from qemu-img convert -O raw")
			}
			compareInfo(t, dir, "img.vmdk")
			compareMap(t, dir, "img.vmdk")
		})
	}
}

// compareInfo checks that info (human and JSON) matches qemu-img's.
func compareInfo(t *testing.T, dir, base string) {
	t.Helper()
	wd, _ := os.Getwd()
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	human, js := info(t, base)
	os.Chdir(wd)
	if want := run(t, dir, "qemu-img", "info", "-f", "vmdk", base); human != want {
		t.Errorf("info:\n%s\nqemu-img:\n%s", human, want)
	}
	if want := run(t, dir, "qemu-img", "info", "-f", "vmdk", "--output=json", base); js != want {
		t.Errorf("info --output=json:\n%s\nqemu-img:\n%s", js, want)
	}
}

// compareMap checks block status against qemu-img map --output=json.
func compareMap(t *testing.T, dir, base string) {
	t.Helper()
	img, err := formats.Open(filepath.Join(dir, base), formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := run(t, dir, "qemu-img", "map", "-f", "vmdk", "--output=json", base)
	var b strings.Builder
	b.WriteString("[")
	type row struct {
		start, length, offset int64
		depth                 int
		present, zero, data   bool
		hasOffset             bool
	}
	var rows []row
	for off := int64(0); off < img.Size(); {
		e, err := formats.ChainStatus(img, off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		r := row{start: off, length: e.Length, depth: e.Depth, present: e.Present, zero: e.Status&formats.StatusZero != 0,
			data: e.Status&formats.StatusData != 0, hasOffset: e.Status&formats.StatusOffsetValid != 0, offset: e.Offset}
		if n := len(rows); n > 0 {
			p := &rows[n-1]
			if p.depth == r.depth && p.present == r.present && p.zero == r.zero && p.data == r.data && p.hasOffset == r.hasOffset &&
				(!r.hasOffset || p.offset+p.length == r.offset) {
				p.length += r.length
				off += e.Length
				continue
			}
		}
		rows = append(rows, r)
		off += e.Length
	}
	for i, r := range rows {
		if i > 0 {
			b.WriteString(",\n")
		}
		b.WriteString(`{ "start": ` + itoa(r.start) + `, "length": ` + itoa(r.length) + `, "depth": ` + itoa(int64(r.depth)) + `, "present": ` +
			btoa(r.present) + `, "zero": ` + btoa(r.zero) + `, "data": ` + btoa(r.data))
		if r.hasOffset {
			b.WriteString(`, "offset": ` + itoa(r.offset))
		}
		b.WriteString("}")
	}
	b.WriteString("]\n")
	if b.String() != want {
		t.Errorf("block status:\n%s\nqemu-img map:\n%s", b.String(), want)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func btoa(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

var cidLine = regexp.MustCompile(`(?m)^CID=[0-9a-f]+$`)

// maskDescriptor returns the descriptor text of a file with its random
// CID masked, and the file with the text zeroed.
func maskDescriptor(b []byte) (string, []byte) {
	i := bytes.Index(b, []byte("# Disk DescriptorFile"))
	if i < 0 {
		return "", b
	}
	n := bytes.IndexByte(b[i:], 0)
	if n < 0 {
		// A text descriptor file: its length follows the CID's.
		return cidLine.ReplaceAllString(string(b[i:]), "CID=X"), b[:i]
	}
	text := cidLine.ReplaceAllString(string(b[i:i+n]), "CID=X")
	rest := append([]byte(nil), b...)
	clear(rest[i : i+n])
	return text, rest
}

// sameModuloCID compares two image files, ignoring the random CID.
func sameModuloCID(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	tx, x := maskDescriptor(x)
	ty, y := maskDescriptor(y)
	if tx != ty {
		t.Errorf("descriptors differ:\n%s\nqemu-img:\n%s", tx, ty)
	}
	if !bytes.Equal(x, y) {
		i := 0
		for i < min(len(x), len(y)) && x[i] == y[i] {
			i++
		}
		t.Errorf("%s and %s differ at byte %#x (sizes %d, %d)", a, b, i, len(x), len(y))
	}
}

func TestCreateMatchesQemu(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		opts  string
		size  string
		files []string
	}{
		{"subformat=monolithicSparse", "3G", nil},
		{"subformat=streamOptimized", "100M", nil},
		{"subformat=monolithicFlat", "1M", []string{"img-flat.vmdk"}},
		{"subformat=twoGbMaxExtentSparse", "5G", []string{"img-s001.vmdk", "img-s002.vmdk", "img-s003.vmdk"}},
		{"subformat=twoGbMaxExtentFlat", "100M", []string{"img-f001.vmdk"}},
		{"zeroed_grain=on,adapter_type=buslogic,hwversion=7,toolsversion=42", "1000", nil},
		{"compat6=on,adapter_type=legacyESX", "200G", nil},
	} {
		t.Run(tc.opts, func(t *testing.T) {
			ours, theirs := t.TempDir(), t.TempDir()
			d := formats.Lookup("vmdk")
			o := formats.NewOptions(d.CreateSpecs())
			if err := o.Parse(tc.opts + ",size=" + tc.size); err != nil {
				t.Fatal(err)
			}
			if err := d.Create(filepath.Join(ours, "img.vmdk"), o); err != nil {
				t.Fatal(err)
			}
			run(t, theirs, "qemu-img", "create", "-q", "-f", "vmdk", "-o", tc.opts, "img.vmdk", tc.size)
			for _, f := range append([]string{"img.vmdk"}, tc.files...) {
				sameModuloCID(t, filepath.Join(ours, f), filepath.Join(theirs, f))
			}
			run(t, ours, "qemu-img", "check", "img.vmdk")
			compareInfo(t, ours, "img.vmdk")
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ opts, want string }{
		{"backing_fmt=raw,backing_file=base.raw", "backing_file must be a vmdk image"},
		{"adapter_type=scsi", "invalid parameter value: scsi"},
		{"subformat=monolithic", "invalid parameter value: monolithic"},
		{"compat6=on,hwversion=7", "compat6 cannot be enabled with hwversion set"},
		{"subformat=monolithicFlat,backing_file=x.vmdk", "Flat image can't have backing file"},
		{"subformat=twoGbMaxExtentFlat,zeroed_grain=on", "Flat image can't enable zeroed grain"},
		{"backing_file=base.raw", "Invalid backing file format: raw. Must be vmdk"},
		{"preallocation=metadata", "Unsupported preallocation mode: metadata"},
	} {
		d := formats.Lookup("vmdk")
		o := formats.NewOptions(d.CreateSpecs())
		if err := o.Parse(tc.opts + ",size=1M"); err != nil {
			t.Fatal(err)
		}
		err := d.Create(filepath.Join(dir, "img.vmdk"), o)
		if err == nil || err.Error() != tc.want {
			t.Errorf("-o %s: %v, want %q", tc.opts, err, tc.want)
		}
	}
}

// pattern is deterministic test data that compresses somewhat.
func pattern(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64() & 0x0f0f0f0f0f0f0f0f
		binary.LittleEndian.PutUint64(b[i:], v)
	}
	return b
}

func TestOurWritesPassQemu(t *testing.T) {
	needQemu(t)
	const size = 3<<20 + 1536
	for _, opts := range []string{"subformat=monolithicSparse", "zeroed_grain=on", "subformat=twoGbMaxExtentSparse", "subformat=monolithicFlat"} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			name := filepath.Join(dir, "img.vmdk")
			img := created(t, name, opts, size)
			want := make([]byte, size)
			write := func(off int64, data []byte) {
				if _, err := img.WriteAt(data, off); err != nil {
					t.Fatal(err)
				}
				copy(want[off:], data)
			}
			write(100, pattern(70000, 1))
			write(1<<20, pattern(200000, 2))
			write(size-1000, pattern(1000, 3))
			if err := img.(formats.Zeroer).WriteZeroes(1<<20+65536, 65536, true); err != nil {
				t.Fatal(err)
			}
			clear(want[1<<20+65536 : 1<<20+131072])
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(dir, "want.raw")
			if err := os.WriteFile(raw, want, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, dir, "qemu-img", "check", "img.vmdk")
			run(t, dir, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", "img.vmdk", "want.raw")
			compareInfo(t, dir, "img.vmdk")
			compareMap(t, dir, "img.vmdk")
		})
	}
}

// created makes an image with our driver and opens it read-write.
func created(t *testing.T, name, opts string, size int64) formats.Image {
	t.Helper()
	d := formats.Lookup("vmdk")
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(opts + ",size=" + itoa(size)); err != nil {
		t.Fatal(err)
	}
	if err := d.Create(name, o); err != nil {
		t.Fatal(err)
	}
	img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk"})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestStreamConvert converts the same content to streamOptimized with
// our convert and with qemu-img's: the files have the same layout (up to
// the compressed bytes, which another deflate implementation makes
// differently) and read the same.
func TestStreamConvert(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	const size = 1<<20 + 200*1024 + 512
	data := append(pattern(1<<20, 7), make([]byte, 200*1024+512)...)
	copy(data[1<<20+3*65536:], bytes.Repeat([]byte("hello\n"), 1000))
	raw := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := formats.Open(raw, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	ours := filepath.Join(dir, "ours.vmdk")
	if err := control.Convert(context.Background(), control.ConvertOptions{Sources: []formats.Image{src},
		Target: ours, TargetFormat: "vmdk", Options: "subformat=streamOptimized", SparseSize: control.DefaultSparseSize}); err != nil {
		t.Fatal(err)
	}
	run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.raw", "theirs.vmdk")
	a, _ := os.ReadFile(ours)
	b, _ := os.ReadFile(filepath.Join(dir, "theirs.vmdk"))
	// Header and descriptor (but the CID and the file name) agree.
	if !bytes.Equal(a[:0x200], b[:0x200]) {
		t.Errorf("headers differ:\n%x\n%x", a[:80], b[:80])
	}
	run(t, dir, "qemu-img", "check", "ours.vmdk")
	run(t, dir, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", "ours.vmdk", "src.raw")
	if got := readAll(t, filepath.Join(dir, "theirs.vmdk")); !bytes.Equal(got, data) {
		t.Errorf("qemu-img's stream image reads differently")
	}
	if len(a) != len(b) {
		t.Logf("file sizes: ours %d, qemu-img %d", len(a), len(b))
	}
	compareMap(t, dir, "ours.vmdk")
}
