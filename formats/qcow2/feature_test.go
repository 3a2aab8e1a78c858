package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// compareRaw requires qemu-img compare to find the image equal to want.
func compareRaw(t *testing.T, name string, want []byte) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", name, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}

// TestCompressedWrite compresses clusters on many goroutines, stores
// them, overwrites some, and checks the result with qemu-img.
func TestCompressedWrite(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{"size=1000k", "compression_type=zstd,size=1000k", "cluster_size=512,size=200k",
		"cluster_size=4k,refcount_bits=2,size=500k", "extended_l2=on,size=1M"} {
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "c.qcow2")
			if err := createOpts(t, name, opts); err != nil {
				t.Fatal(err)
			}
			img := openImg(t, name, false)
			cs := img.CompressionUnit()
			want := make([]byte, img.Size())
			n := img.Size() / cs
			out := make([][]byte, n)
			rng := rand.New(rand.NewSource(1))
			for i := int64(0); i < n; i++ {
				c := want[i*cs : (i+1)*cs]
				if i%7 == 3 {
					rng.Read(c) // incompressible
				} else {
					for j := range c {
						c[j] = byte(i) + byte(j/100)
					}
				}
			}
			var wg sync.WaitGroup
			for i := int64(0); i < n; i++ {
				wg.Add(1)
				go func(i int64) {
					defer wg.Done()
					if o, ok := img.Compress(make([]byte, 0, cs), want[i*cs:(i+1)*cs]); ok {
						out[i] = o
					}
				}(i)
			}
			wg.Wait()
			for i := int64(0); i < n; i++ {
				var err error
				if out[i] == nil {
					if i%7 != 3 {
						t.Fatalf("cluster %d did not compress", i)
					}
					_, err = img.WriteAt(want[i*cs:(i+1)*cs], i*cs)
				} else {
					err = img.WriteCompressed(i*cs, out[i])
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			// Overwrite parts of compressed clusters (copy on write) and
			// recompress one that was already compressed.
			p := bytes.Repeat([]byte{0xee}, 1000)
			for _, off := range []int64{100, 5 * cs, 9*cs + cs/2} {
				if off+int64(len(p)) <= int64(len(want)) {
					if _, err := img.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(want[off:], p)
				}
			}
			if o, ok := img.Compress(nil, want[cs:2*cs]); ok {
				if err := img.WriteCompressed(cs, o); err != nil {
					t.Fatal(err)
				}
			}
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("read back differs at %#x", diffOffset(got, want))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, name)
			compareRaw(t, name, want)
		})
	}
}

// TestCompressNotSmaller: ok=false when compression does not help.
func TestCompressNotSmaller(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "c.qcow2")
	if err := createOpts(t, name, "cluster_size=512,size=1M"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, true)
	defer img.Close()
	src := make([]byte, 512)
	rand.New(rand.NewSource(2)).Read(src)
	if _, ok := img.Compress(nil, src); ok {
		t.Error("random data compressed")
	}
	if o, ok := img.Compress(nil, make([]byte, 512)); !ok || len(o) >= 512 {
		t.Errorf("zeroes: %d bytes, %v", len(o), ok)
	}
}

// TestResizeMatchesQemu resizes copies of one image with qemu-img and
// with the driver and requires identical files.
func TestResizeMatchesQemu(t *testing.T) {
	haveQemu(t)
	cases := []struct {
		opts, from, to, prealloc string
		shrink                   bool
	}{
		{"", "1M", "5G", "", false},
		{"cluster_size=512", "1M", "300M", "", false},
		{"", "1G", "600M", "", true},
		{"", "20M", "1M", "", true},
		{"compat=0.10", "1M", "2G", "", false},
		{"", "1M", "10M", "metadata", false},
		{"", "1M", "10M", "falloc", false},
		{"", "1M", "3M", "full", false},
		{"extended_l2=on", "1M", "700M", "", false},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.opts, ",", "+")+"/"+c.from+"-"+c.to+"-"+c.prealloc, func(t *testing.T) {
			dir := t.TempDir()
			a := filepath.Join(dir, "a.qcow2")
			b := filepath.Join(dir, "b.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			execOut(t, "qemu-img", append(args, a, c.from)...)
			qemuIO(t, a, "write -P 1 0 100k", "write -P 2 500k 300k")
			execOut(t, "cp", a, b)
			args = []string{"resize", "-q", "-f", "qcow2"}
			if c.shrink {
				args = append(args, "--shrink")
			}
			if c.prealloc != "" {
				args = append(args, "--preallocation="+c.prealloc)
			}
			execOut(t, "qemu-img", append(args, a, c.to)...)
			size, _ := formats.ParseSize(c.to)
			img := openImg(t, b, false)
			if err := img.Resize(int64(size), c.prealloc, c.shrink); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			want, _ := os.ReadFile(a)
			got, _ := os.ReadFile(b)
			if !bytes.Equal(got, want) {
				t.Errorf("differs from qemu-img's at %#x (sizes %d, %d)", diffOffset(got, want), len(got), len(want))
			}
			mustBeClean(t, b)
		})
	}
}

// infoData returns qemu-img info's format-specific data and snapshots.
func infoData(t *testing.T, name string) (map[string]any, []any) {
	t.Helper()
	var info struct {
		Snapshots      []any `json:"snapshots"`
		FormatSpecific struct {
			Data map[string]any `json:"data"`
		} `json:"format-specific"`
	}
	out := execOut(t, "qemu-img", "info", "-U", "--output=json", name)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return info.FormatSpecific.Data, info.Snapshots
}

// toJSONValue converts a formats.Object value to what encoding/json
// decodes the same QAPI value into.
func toJSONValue(v any) any {
	switch v := v.(type) {
	case formats.Object:
		m := map[string]any{}
		for _, mem := range v {
			m[mem.Key] = toJSONValue(mem.Value)
		}
		return m
	case []any:
		out := make([]any, len(v))
		for i := range v {
			out[i] = toJSONValue(v[i])
		}
		return out
	case int64:
		return float64(v)
	case uint64:
		return float64(v)
	}
	return v
}

// TestDescribeMatchesQemu compares the format-specific info and the
// snapshot list with qemu-img info.
func TestDescribeMatchesQemu(t *testing.T) {
	haveQemu(t)
	cases := []struct {
		opts string
		prep func(t *testing.T, name string)
	}{
		{opts: ""},
		{opts: "compat=0.10"},
		{opts: "compression_type=zstd,lazy_refcounts=on,refcount_bits=8"},
		{opts: "extended_l2=on"},
		{opts: "data_file=DATA"},
		{opts: "data_file=DATA,data_file_raw=on"},
		{opts: "", prep: func(t *testing.T, name string) {
			execOut(t, "qemu-img", "bitmap", "--add", name, "bm1")
			execOut(t, "qemu-img", "bitmap", "--add", "-g", "128k", "--disable", name, "bm2")
		}},
		{opts: "", prep: func(t *testing.T, name string) {
			qemuIO(t, name, "write -P 1 0 64k")
			execOut(t, "qemu-img", "snapshot", "-c", "first", name)
			execOut(t, "qemu-img", "snapshot", "-c", "second snapshot", name)
		}},
		{opts: "compat=0.10", prep: func(t *testing.T, name string) {
			execOut(t, "qemu-img", "snapshot", "-c", "old", name)
		}},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.opts, ",", "+"), func(t *testing.T) {
			dir := t.TempDir()
			name := filepath.Join(dir, "d.qcow2")
			opts := strings.ReplaceAll(c.opts, "DATA", filepath.Join(dir, "data.raw"))
			args := []string{"create", "-q", "-f", "qcow2"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			execOut(t, "qemu-img", append(args, name, "1M")...)
			if c.prep != nil {
				c.prep(t, name)
			}
			wantData, wantSnaps := infoData(t, name)
			img := openImg(t, name, true)
			defer img.Close()
			d, err := img.Describe()
			if err != nil {
				t.Fatal(err)
			}
			if d.ClusterSize != img.lay.ClusterSize || !d.HasDirtyFlag || d.DirtyFlag {
				t.Errorf("description %+v", d)
			}
			got := toJSONValue(d.FormatSpecific.Data)
			if g, _ := json.Marshal(got); string(g) != mustJSON(t, wantData) {
				t.Errorf("format-specific:\ngot  %s\nwant %s", g, mustJSON(t, wantData))
			}
			if len(d.Snapshots) != len(wantSnaps) {
				t.Fatalf("%d snapshots, want %d", len(d.Snapshots), len(wantSnaps))
			}
			for i, s := range d.Snapshots {
				w := wantSnaps[i].(map[string]any)
				if s.ID != w["id"] || s.Name != w["name"] || float64(s.DateSec) != w["date-sec"] ||
					float64(s.DateNsec) != w["date-nsec"] || float64(s.VMStateSize) != w["vm-state-size"] ||
					float64(s.VMClockNsec%1e9) != w["vm-clock-nsec"] || (w["icount"] != nil) != s.HasICount {
					t.Errorf("snapshot %d: %+v, want %v", i, s, w)
				}
			}
		})
	}
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// patchHeader rewrites bytes of a file.
func patchFile(t *testing.T, name string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// TestHeaderPreserved: unknown header fields and extensions survive a
// header rewrite, unknown autoclear bits are cleared on a read-write
// open, and QEMU still accepts the image.
func TestHeaderPreserved(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "h.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	f, err := formats.OpenFile(name, true, false)
	if err != nil {
		t.Fatal(err)
	}
	h, err := readHeader(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	h.HeaderLength = headerV3Len + 16
	h.UnknownFields = []byte("unknownfields!!!")
	h.Unknown = append(h.Unknown, Extension{Type: 0x12345678, Data: []byte("hello")})
	h.AutoclearFeatures |= 1 << 7
	buf, err := h.Encode()
	if err != nil {
		t.Fatal(err)
	}
	patchFile(t, name, 0, buf)
	img := openImg(t, name, false)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	f, _ = formats.OpenFile(name, true, false)
	h2, err := readHeader(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if h2.AutoclearFeatures != 0 {
		t.Errorf("autoclear %#x not cleared", h2.AutoclearFeatures)
	}
	if string(h2.UnknownFields) != "unknownfields!!!" || len(h2.Unknown) != 1 || string(h2.Unknown[0].Data) != "hello" {
		t.Errorf("unknown parts lost: %q %+v", h2.UnknownFields, h2.Unknown)
	}
	mustBeClean(t, name)
}

// TestOpenErrors compares open failures of damaged headers with
// qemu-io's messages.
func TestOpenErrors(t *testing.T) {
	haveQemu(t)
	cases := []struct {
		name  string
		patch func(t *testing.T, name string)
	}{
		{"version", func(t *testing.T, n string) { patchFile(t, n, 4, be32(4)) }},
		{"cluster bits", func(t *testing.T, n string) { patchFile(t, n, 20, be32(22)) }},
		{"unknown incompatible", func(t *testing.T, n string) { patchFile(t, n, 72, be64(1<<9)) }},
		{"unknown incompatible named", func(t *testing.T, n string) {
			patchFile(t, n, 72, be64(1<<2|1<<5))
		}},
		{"header too short", func(t *testing.T, n string) { patchFile(t, n, 100, be32(100)) }},
		{"refcount order", func(t *testing.T, n string) { patchFile(t, n, 96, be32(7)) }},
		{"l1 too large", func(t *testing.T, n string) { patchFile(t, n, 36, be32(1<<23)) }},
		{"l1 too small", func(t *testing.T, n string) { patchFile(t, n, 36, be32(0)) }},
		{"l1 offset", func(t *testing.T, n string) { patchFile(t, n, 40, be64(0x30001)) }},
		{"reftable too large", func(t *testing.T, n string) { patchFile(t, n, 56, be32(1<<20)) }},
		{"no reftable", func(t *testing.T, n string) { patchFile(t, n, 56, be32(0)) }},
		{"snapshots", func(t *testing.T, n string) { patchFile(t, n, 60, be32(1<<20)) }},
		{"backing offset", func(t *testing.T, n string) { patchFile(t, n, 8, be64(1<<20)) }},
		{"compression", func(t *testing.T, n string) { patchFile(t, n, 104, []byte{1}) }},
		{"corrupt", func(t *testing.T, n string) { patchFile(t, n, 72, be64(IncompatCorrupt)) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "x.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
			c.patch(t, name)
			out, _ := exec.Command("qemu-io", "-f", "qcow2", "-c", "read 0 512", name).CombinedOutput()
			want := strings.TrimSpace(string(out))
			want = strings.TrimPrefix(want, "qemu-io: can't open device "+name+": ")
			_, err := formats.Open(name, formats.OpenOptions{Format: "qcow2"})
			if err == nil {
				t.Fatalf("opened; qemu-io says %q", want)
			}
			if err.Error() != want {
				t.Errorf("got %q\nwant %q", err, want)
			}
		})
	}
}

// TestCorruptBit: a corrupt image opens read-only only; a metadata
// overlap found while allocating marks the image corrupt.
func TestCorruptBit(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "x.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	qemuIO(t, name, "write -P 1 0 64k")
	// Drop the refcount of the L2 table (cluster 4) to 0: the next
	// allocation picks it and must be refused.
	patchFile(t, name, 2*65536+4*2, []byte{0, 0})
	img := openImg(t, name, false)
	_, err := img.WriteAt([]byte{1}, 512<<10)
	if !errors.Is(err, formats.ErrCorrupt) {
		t.Fatalf("write over metadata: %v", err)
	}
	img.Close()
	data, _ := infoData(t, name)
	if data["corrupt"] != true {
		t.Errorf("corrupt bit not set: %v", data)
	}
	if _, err := formats.Open(name, formats.OpenOptions{Format: "qcow2"}); err == nil ||
		err.Error() != "qcow2: Image is corrupt; cannot be opened read/write" {
		t.Errorf("read-write open of a corrupt image: %v", err)
	}
	ro := openImg(t, name, true)
	defer ro.Close()
	buf := make([]byte, 64<<10)
	if _, err := ro.ReadAt(buf, 0); err != nil || buf[100] != 1 {
		t.Errorf("read-only read: %v", err)
	}
}

// TestDamagedDataReadError: open succeeds, the read of the damaged
// range fails with ErrCorrupt naming file and offset.
func TestDamagedDataReadError(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "x.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	qemuIO(t, name, "write -P 1 0 64k")
	// L2 entry 0 (L2 table at cluster 4) with an unaligned offset.
	patchFile(t, name, 4*65536, be64(OflagCopied|0x50200))
	img := openImg(t, name, true)
	defer img.Close()
	_, err := img.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, formats.ErrCorrupt) || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "0x50200") {
		t.Fatalf("got %v", err)
	}
	if _, err := img.ReadAt(make([]byte, 512), 512<<10); err != nil {
		t.Errorf("undamaged range: %v", err)
	}
}

// TestLazyRefcounts: the dirty bit is set while writing and cleared on
// close; an image left dirty with stale refcounts is repaired on the
// next read-write open.
func TestLazyRefcounts(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "l.qcow2")
	if err := createOpts(t, name, "lazy_refcounts=on,size=4M"); err != nil {
		t.Fatal(err)
	}
	img := openImg(t, name, false)
	p := bytes.Repeat([]byte{7}, 200<<10)
	if _, err := img.WriteAt(p, 100<<10); err != nil {
		t.Fatal(err)
	}
	if d, _ := img.Describe(); !d.DirtyFlag {
		t.Error("dirty bit not set while writing")
	}
	// Simulate a crash: the L2 tables reach the disk, the refcounts do not.
	img.mu.Lock()
	if err := img.flushL2(); err != nil {
		t.Fatal(err)
	}
	img.mu.Unlock()
	crashed := filepath.Join(dir, "crashed.qcow2")
	execOut(t, "cp", name, crashed)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, name)
	if data, _ := infoData(t, name); data["lazy-refcounts"] != true {
		t.Errorf("info: %v", data)
	}
	if out, _ := exec.Command("qemu-img", "check", "-U", crashed).CombinedOutput(); bytes.Contains(out, []byte("No errors")) {
		t.Fatalf("crashed copy should need repair:\n%s", out)
	}
	rep := openImg(t, crashed, false)
	got := make([]byte, len(p))
	if _, err := rep.ReadAt(got, 100<<10); err != nil || !bytes.Equal(got, p) {
		t.Errorf("repaired image content: %v", err)
	}
	if err := rep.Close(); err != nil {
		t.Fatal(err)
	}
	mustBeClean(t, crashed)
}

// TestBitmapsMarkedInUse: writing flags enabled bitmaps in use on disk
// while the image is open (a crash leaves them inconsistent) and leaves
// disabled ones alone; closing stores them and clears the flag; the
// image stays clean for qemu-img check.
func TestBitmapsMarkedInUse(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "b.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	execOut(t, "qemu-img", "bitmap", "--add", name, "on")
	execOut(t, "qemu-img", "bitmap", "--add", "--disable", name, "off")
	img := openImg(t, name, false)
	if _, err := img.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`[{"flags":["in-use","auto"],"granularity":65536,"name":"on"},{"flags":[],"granularity":65536,"name":"off"}]`,
		`[{"flags":["auto"],"granularity":65536,"name":"on"},{"flags":[],"granularity":65536,"name":"off"}]`,
	} {
		data, _ := infoData(t, name)
		if got := mustJSON(t, data["bitmaps"]); got != want {
			t.Errorf("bitmaps %s, want %s", got, want)
		}
		img.Close()
	}
	mustBeClean(t, name)
}

// TestMakeEmptyMatchesCommit: emptying a plain v3 top image gives the
// file qemu-img commit leaves behind.
func TestMakeEmptyMatchesCommit(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{"cluster_size=65536", "cluster_size=4k,refcount_bits=8", "lazy_refcounts=on", "compat=0.10"} {
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
			a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "qcow2", a)
			qemuIO(t, a, "write -P 1 0 1M", "write -c -P 2 3M 64k", "write -P 3 7M 100k")
			execOut(t, "cp", a, b)
			execOut(t, "qemu-img", "commit", "-q", a)
			img := openImg(t, b, false)
			if err := img.MakeEmpty(); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			want, _ := os.ReadFile(a)
			got, _ := os.ReadFile(b)
			if !bytes.Equal(got, want) {
				t.Errorf("differs from qemu-img commit's at %#x (sizes %d, %d)", diffOffset(got, want), len(got), len(want))
			}
			mustBeClean(t, b)
		})
	}
}
