package vmdk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// Differential tests against QEMU 7.2's qemu-img and qemu-io.

// qemuWrites are the writes made to images before reading them back: data
// across grains and extents' ends, a partial grain, zeroes.
var qemuWrites = []string{
	"write -P 0x11 0 4k",
	"write -P 0x22 60k 8k",
	"write -P 0x33 1M 128k",
	"write -P 0x44 3M 512",
	"write -z 1M 64k",
}

func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
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
			name := filepath.Join(dir, "img.vmdk")
			formatstest.Exec(t, "qemu-img", "create", "-f", "vmdk", "-o", tc.opts, name, "5000k")
			formatstest.QemuIO(t, "vmdk", name, qemuWrites...)
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vmdk", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "vmdk", name)
		})
	}
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
	formatstest.RequireQemu(t)
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
			if err := formatstest.Create(t, "vmdk", filepath.Join(ours, "img.vmdk"), tc.opts+",size="+tc.size); err != nil {
				t.Fatal(err)
			}
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", tc.opts, filepath.Join(theirs, "img.vmdk"), tc.size)
			for _, f := range append([]string{"img.vmdk"}, tc.files...) {
				sameModuloCID(t, filepath.Join(ours, f), filepath.Join(theirs, f))
			}
			formatstest.Exec(t, "qemu-img", "check", filepath.Join(ours, "img.vmdk"))
			formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(ours, "img.vmdk"))
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
		err := formatstest.Create(t, "vmdk", filepath.Join(dir, "img.vmdk"), tc.opts+",size=1M")
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
	formatstest.RequireQemu(t)
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
			formatstest.Exec(t, "qemu-img", "check", filepath.Join(dir, "img.vmdk"))
			formatstest.Exec(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", filepath.Join(dir, "img.vmdk"), filepath.Join(dir, "want.raw"))
			formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "img.vmdk"))
		})
	}
}

// created makes an image with our driver and opens it read-write.
func created(t *testing.T, name, opts string, size int64) formats.Image {
	t.Helper()
	if err := formatstest.Create(t, "vmdk", name, opts+",size="+strconv.FormatInt(size, 10)); err != nil {
		t.Fatal(err)
	}
	return formatstest.Open(t, name, formats.OpenOptions{Format: "vmdk"})
}

// TestStreamConvert converts the same content to streamOptimized with
// our convert and with qemu-img's: the files have the same layout (up to
// the compressed bytes, which another deflate implementation makes
// differently) and read the same.
func TestStreamConvert(t *testing.T) {
	formatstest.RequireQemu(t)
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
	formatstest.Exec(t, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", filepath.Join(dir, "src.raw"), filepath.Join(dir, "theirs.vmdk"))
	a, _ := os.ReadFile(ours)
	b, _ := os.ReadFile(filepath.Join(dir, "theirs.vmdk"))
	// Header and descriptor (but the CID and the file name) agree.
	if !bytes.Equal(a[:0x200], b[:0x200]) {
		t.Errorf("headers differ:\n%x\n%x", a[:80], b[:80])
	}
	formatstest.Exec(t, "qemu-img", "check", filepath.Join(dir, "ours.vmdk"))
	formatstest.Exec(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", filepath.Join(dir, "ours.vmdk"), filepath.Join(dir, "src.raw"))
	if got := formatstest.ReadAll(t, formatstest.Open(t, filepath.Join(dir, "theirs.vmdk"), formats.OpenOptions{Format: "vmdk", ReadOnly: true})); !bytes.Equal(got, data) {
		t.Errorf("qemu-img's stream image reads differently")
	}
	if len(a) != len(b) {
		t.Logf("file sizes: ours %d, qemu-img %d", len(a), len(b))
	}
	formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "ours.vmdk"))
}
