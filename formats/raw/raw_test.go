package raw_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw"
	"golang.org/x/sys/unix"
)

// create makes a raw image with imgfs; opts is a -o list without size.
func create(t *testing.T, name string, size any, opts string) error {
	t.Helper()
	list := fmt.Sprintf("size=%v", size)
	if opts != "" {
		list += "," + opts
	}
	return formatstest.Create(t, "raw", name, list)
}

func TestConformance(t *testing.T) {
	for _, opts := range []string{"preallocation=off", "preallocation=falloc", "preallocation=full"} {
		t.Run(opts, func(t *testing.T) { formatstest.Run(t, formatstest.Created("raw", opts)) })
	}
}

// mapEntry is one entry of `qemu-img map --output=json`.
type mapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Zero   bool  `json:"zero"`
	Data   bool  `json:"data"`
	Offset int64 `json:"offset"`
}

// qemuMap returns qemu-img's map of a raw file.
func qemuMap(t *testing.T, name string) []mapEntry {
	t.Helper()
	var m []mapEntry
	if err := json.Unmarshal([]byte(formatstest.Exec(t, "qemu-img", "map", "-f", "raw", "--output=json", name)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// ourMap walks BlockStatus and merges runs as qemu-img map does.
func ourMap(t *testing.T, img formats.Image) []mapEntry {
	t.Helper()
	var m []mapEntry
	for off := int64(0); off < img.Size(); {
		e, err := img.BlockStatus(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if e.Status&formats.StatusOffsetValid == 0 || e.Offset != off || e.File != img.Filename() {
			t.Fatalf("extent at %d: %+v, want offset %d in %s", off, e, off, img.Filename())
		}
		cur := mapEntry{Start: off, Length: e.Length, Zero: e.Status&formats.StatusZero != 0,
			Data: e.Status&formats.StatusData != 0, Offset: off}
		if n := len(m); n > 0 && m[n-1].Zero == cur.Zero && m[n-1].Data == cur.Data {
			m[n-1].Length += cur.Length
		} else {
			m = append(m, cur)
		}
		off += e.Length
	}
	return m
}

func TestMapMatchesQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	tests := []struct {
		name  string
		setup func(path string) error
	}{
		// Files written directly, with holes, including a size that is not
		// a whole sector (the tail of the last sector is a zero extent).
		{"holes", func(p string) error {
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				return err
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			f.Truncate(10 << 20)
			f.WriteAt(bytes.Repeat([]byte{1}, 100), 0)
			f.WriteAt([]byte{2}, 5_000_000)
			return nil
		}},
		{"odd-size", func(p string) error {
			return os.WriteFile(p, bytes.Repeat([]byte{3}, 1000), 0o644)
		}},
		{"trailing-data", func(p string) error {
			f, err := os.Create(p)
			if err != nil {
				return err
			}
			defer f.Close()
			f.Truncate(10_000_001)
			_, err = f.WriteAt([]byte{4}, 10_000_000)
			return err
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			if err := tc.setup(p); err != nil {
				t.Fatal(err)
			}
			img := formatstest.Open(t, p, formats.OpenOptions{Format: "raw"})
			want := qemuMap(t, p)
			if got := ourMap(t, img); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("map:\n got %v\nwant %v", got, want)
			}
			if want := formatstest.QemuVirtualSize(t, "raw", p); img.Size() != want {
				t.Errorf("Size() = %d, qemu-img says %d", img.Size(), want)
			}
		})
	}
}

// TestCreateMatchesQemu creates images with imgfs and with qemu-img and
// compares file size, allocation map and content.
func TestCreateMatchesQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	for _, tc := range []struct {
		size int64
		opts string
	}{
		{1 << 20, ""},
		{1 << 20, "preallocation=off"},
		{1 << 20, "preallocation=falloc"},
		{1 << 20, "preallocation=full"},
		{1000, ""},
		{3000, "preallocation=falloc"},
		{3000, "preallocation=full"},
		{0, ""},
		{5 << 20, "nocow=on,extent_size_hint=1M"},
	} {
		t.Run(fmt.Sprintf("%d,%s", tc.size, tc.opts), func(t *testing.T) {
			ours, theirs := filepath.Join(dir, "ours"), filepath.Join(dir, "theirs")
			os.Remove(ours)
			os.Remove(theirs)
			if err := create(t, ours, tc.size, tc.opts); err != nil {
				t.Fatal(err)
			}
			args := []string{"create", "-q", "-f", "raw"}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			formatstest.Exec(t, "qemu-img", append(args, theirs, fmt.Sprint(tc.size))...)
			for _, p := range []string{ours, theirs} {
				st, _ := os.Stat(p)
				t.Logf("%s: %d bytes", p, st.Size())
			}
			so, _ := os.Stat(ours)
			st, _ := os.Stat(theirs)
			if so.Size() != st.Size() {
				t.Errorf("file size %d, qemu-img makes %d", so.Size(), st.Size())
			}
			if a, b := fmt.Sprint(qemuMap(t, ours)), fmt.Sprint(qemuMap(t, theirs)); a != b {
				t.Errorf("map:\n got %s\nwant %s", a, b)
			}
			if out := formatstest.Exec(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ours, theirs); !strings.Contains(out, "identical") {
				t.Errorf("compare: %s", out)
			}
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		opts    string
		want    string
		created bool // whether QEMU leaves the file behind
	}{
		{"preallocation=xx", "invalid parameter value: xx", false},
		{"preallocation=OFF", "invalid parameter value: OFF", false},
		{"preallocation=", "invalid parameter value: ", false},
		{"extent_size_hint=5G", "Extent size hint is too large", false},
		{"preallocation=metadata", "Unsupported preallocation mode: metadata", true},
	}
	for _, tc := range tests {
		t.Run(tc.opts, func(t *testing.T) {
			p := filepath.Join(dir, strings.NewReplacer("=", "_").Replace(tc.opts)+".raw")
			err := create(t, p, 1<<20, tc.opts)
			if err == nil || err.Error() != tc.want {
				t.Errorf("Create error %q, want %q", err, tc.want)
			}
			if _, serr := os.Stat(p); (serr == nil) != tc.created {
				t.Errorf("file exists: %v, want %v", serr == nil, tc.created)
			}
		})
	}
	// A size that does not fit in off_t fails in ftruncate as in QEMU.
	err := create(t, filepath.Join(dir, "huge"), uint64(1<<63), "")
	if err == nil || err.Error() != "Could not resize file: Invalid argument" {
		t.Errorf("huge size: %v", err)
	}
	err = create(t, filepath.Join(dir, "efbig"), 1<<60, "")
	if !errors.Is(err, unix.EFBIG) {
		t.Errorf("size 1E: %v, want EFBIG", err)
	}
}

func TestProbedRaw(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "p.img")
	if err := create(t, p, 1<<20, ""); err != nil {
		t.Fatal(err)
	}
	var warnings []string
	img := formatstest.Open(t, p, formats.OpenOptions{Warn: func(m string) { warnings = append(warnings, m) }})
	want := "WARNING: Image format was not specified for '" + p + "' and probing guessed raw.\n" +
		"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
		"         Specify the 'raw' format explicitly to remove the restrictions."
	if len(warnings) != 1 || warnings[0] != want {
		t.Errorf("warnings %q, want %q", warnings, want)
	}
	formatstest.RequireTools(t, "qemu-io")
	out, _ := exec.Command("qemu-io", "-c", "read 0 1", p).CombinedOutput()
	if !strings.HasPrefix(string(out), want+"\n") {
		t.Errorf("qemu-io prints\n%s\nwant prefix\n%s", out, want)
	}

	// Read-only opens are not restricted and not warned about.
	warnings = nil
	formatstest.Open(t, p, formats.OpenOptions{ReadOnly: true, Warn: func(m string) { warnings = append(warnings, m) }})
	if len(warnings) != 0 {
		t.Errorf("read-only open warned: %q", warnings)
	}

	fake := fakeMagic
	tests := []struct {
		name string
		off  int64
		data []byte
		ok   bool
	}{
		{"plain data", 0, bytes.Repeat([]byte{0xcd}, 512), true},
		{"magic at 0", 0, append(fake, make([]byte, 504)...), false},
		{"magic by a short write", 0, fake, false},
		{"magic beyond sector 0", 512, fake, true},
		{"partial magic", 0, fake[:7], true},
		{"rest of magic, sub-sector", 7, fake[7:], false},
		{"long write starting in sector 0", 100, make([]byte, 4096), true},
	}
	for _, tc := range tests {
		before := make([]byte, 1024)
		img.ReadAt(before, 0)
		_, err := img.WriteAt(tc.data, tc.off)
		if tc.ok != (err == nil) {
			t.Errorf("%s: WriteAt error %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil {
			if err.Error() != "Operation not permitted" || !errors.Is(err, unix.EPERM) {
				t.Errorf("%s: error %q, want EPERM \"Operation not permitted\"", tc.name, err)
			}
			after := make([]byte, 1024)
			img.ReadAt(after, 0)
			if !bytes.Equal(before, after) {
				t.Errorf("%s: refused write changed the image", tc.name)
			}
		}
	}
	// Zeroing that would complete a signature is refused too.
	if _, err := img.WriteAt([]byte("IMGF\x01TST"), 0); err != nil {
		t.Fatal(err)
	}
	z := img.(formats.Zeroer)
	if err := z.WriteZeroes(4, 1, false); !errors.Is(err, unix.EPERM) {
		t.Errorf("zeroing that completes a signature: %v, want EPERM", err)
	}
	if err := z.WriteZeroes(5, 600, true); err != nil {
		t.Errorf("zeroing that keeps the sector raw: %v", err)
	}

	// Explicit raw is not restricted.
	exp := formatstest.Open(t, p, formats.OpenOptions{Format: "raw"})
	if _, err := exp.WriteAt(fake, 0); err != nil {
		t.Errorf("explicit raw: %v", err)
	}
}

// fakeMagic starts files of the "imgfs-test" format, which stands in for
// a real format in TestProbedRaw. It holds a zero byte so that zeroing can
// complete it.
var fakeMagic = []byte("IMGF\x00TST")

func init() {
	formats.Register(&formats.Driver{
		Name: "imgfs-test",
		Probe: func(buf []byte, _ string) int {
			if bytes.HasPrefix(buf, fakeMagic) {
				return 100
			}
			return 0
		},
	})
}

func TestProbedRawAgainstQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-io")
	// A qcow2 header written through a probed raw image: QEMU refuses it
	// with EPERM, and so do we once a qcow2-like driver is registered
	// (here the stand-in above).
	p := filepath.Join(t.TempDir(), "q.img")
	if err := create(t, p, 1<<20, ""); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "hdr")
	os.WriteFile(src, append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 504)...), 0o644)
	out, _ := exec.Command("qemu-io", "-c", "write -s "+src+" 0 512", p).CombinedOutput()
	if !strings.HasSuffix(string(out), "write failed: Operation not permitted\n") {
		t.Errorf("qemu-io: %s", out)
	}
}

func TestResize(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		from, to int64
		prealloc string
		shrink   bool
		wantErr  string
		fileSize int64
		size     int64
	}{
		{1 << 20, 2 << 20, "off", false, "", 2 << 20, 2 << 20},
		{1 << 20, 2 << 20, "falloc", false, "", 2 << 20, 2 << 20},
		{1 << 20, 2 << 20, "full", false, "", 2 << 20, 2 << 20},
		{1 << 20, 3000, "off", true, "", 3000, 3072},
		{1 << 20, 1000, "off", false, "Use the --shrink option to perform a shrink operation.", 1 << 20, 1 << 20},
		{1 << 20, 1000, "full", true, "Cannot use preallocation for shrinking files", 1 << 20, 1 << 20},
		{1 << 20, 2 << 20, "metadata", false, "Unsupported preallocation mode: metadata", 1 << 20, 1 << 20},
		{1 << 20, 2 << 20, "xx", false, "invalid parameter value: xx", 1 << 20, 1 << 20},
	} {
		name := fmt.Sprintf("%d-%d-%s-%v", tc.from, tc.to, tc.prealloc, tc.shrink)
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, name)
			if err := create(t, p, tc.from, ""); err != nil {
				t.Fatal(err)
			}
			img := formatstest.Open(t, p, formats.OpenOptions{Format: "raw"})
			err := img.(formats.Resizer).Resize(tc.to, tc.prealloc, tc.shrink)
			if (err == nil) != (tc.wantErr == "") || err != nil && err.Error() != tc.wantErr {
				t.Errorf("Resize error %v, want %q", err, tc.wantErr)
			}
			st, _ := os.Stat(p)
			if st.Size() != tc.fileSize || img.Size() != tc.size {
				t.Errorf("file %d bytes, Size() %d; want %d, %d", st.Size(), img.Size(), tc.fileSize, tc.size)
			}
		})
	}
	// Growing an empty file allocates its first block, as qemu-img
	// resize does.
	p := filepath.Join(dir, "empty")
	os.WriteFile(p, nil, 0o644)
	img := formatstest.Open(t, p, formats.OpenOptions{Format: "raw"})
	if err := img.(formats.Resizer).Resize(1<<20, "off", false); err != nil {
		t.Fatal(err)
	}
	if e, _ := img.BlockStatus(0, 1<<20); e.Status&formats.StatusData == 0 || e.Length != 4096 {
		t.Errorf("first extent after growing an empty file: %+v, want 4096 bytes of data", e)
	}
}

func TestDescribe(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d.raw")
	if err := create(t, p, 1<<20, ""); err != nil {
		t.Fatal(err)
	}
	img := formatstest.Open(t, p, formats.OpenOptions{Format: "raw"})
	d, err := img.(formats.Describer).Describe()
	if err != nil {
		t.Fatal(err)
	}
	// qemu-img info --output=json on raw: virtual-size, filename, format,
	// actual-size, dirty-flag (false) -- no cluster-size, no
	// format-specific.
	if d.ClusterSize != 0 || d.FormatSpecific != nil || !d.HasDirtyFlag || d.DirtyFlag || d.Encrypted {
		t.Errorf("Describe() = %+v", d)
	}
}
