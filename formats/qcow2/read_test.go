package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// mapJSON renders the chain's block status as `qemu-img map
// --output=json` does in 7.2, merging extents as img_map does.
func mapJSON(t testing.TB, img formats.Image) string {
	t.Helper()
	type entry struct {
		start, length, offset int64
		depth                 int
		present, zero, data   bool
		hasOffset             bool
	}
	var out []string
	var cur *entry
	emit := func() {
		if cur == nil {
			return
		}
		s := fmt.Sprintf(`{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			cur.start, cur.length, cur.depth, cur.present, cur.zero, cur.data)
		if cur.hasOffset {
			s += fmt.Sprintf(`, "offset": %d`, cur.offset)
		}
		out = append(out, s+"}")
	}
	size := img.Size()
	for off := int64(0); off < size; {
		e, err := formats.ChainStatus(img, off, size-off)
		if err != nil {
			t.Fatalf("status at %d: %v", off, err)
		}
		if e.Length <= 0 {
			t.Fatalf("status at %d: empty extent", off)
		}
		n := entry{start: off, length: e.Length, depth: e.Depth, present: e.Present,
			zero: e.Status&formats.StatusZero != 0, data: e.Status&formats.StatusData != 0,
			hasOffset: e.Status&formats.StatusOffsetValid != 0, offset: e.Offset}
		if cur != nil && cur.depth == n.depth && cur.present == n.present && cur.zero == n.zero &&
			cur.data == n.data && cur.hasOffset == n.hasOffset && (!n.hasOffset || cur.offset+cur.length == n.offset) {
			cur.length += n.length
		} else {
			emit()
			cur = &n
		}
		off += e.Length
	}
	emit()
	return "[" + strings.Join(out, ",\n") + "]\n"
}

// readCase is an image made by qemu-img and qemu-io.
type readCase struct {
	name    string
	opts    string
	size    string
	cmds    []string
	backing string // qemu-io commands for a backing image of the same size
	noMap   bool   // qemu-img map differs for reasons outside this layer
}

func readCases() []readCase {
	pattern := []string{"write -P 0x11 0 64k", "write -P 0x22 100k 3000", "write -P 0x33 1M 1M", "write -P 0x44 5M 12345"}
	return []readCase{
		{name: "v3 default", opts: "", size: "8M", cmds: pattern},
		{name: "v2", opts: "compat=0.10", size: "8M", cmds: pattern},
		{name: "512 clusters", opts: "cluster_size=512", size: "8M", cmds: pattern},
		{name: "2M clusters", opts: "cluster_size=2M", size: "8M", cmds: pattern},
		{name: "refcount 1 bit", opts: "refcount_bits=1,cluster_size=4k", size: "8M", cmds: pattern},
		{name: "refcount 64 bit", opts: "refcount_bits=64", size: "8M", cmds: pattern},
		{name: "zero and discard", opts: "", size: "8M", cmds: append(pattern,
			"write -z 1M 64k", "write -z -u 1152k 128k", "discard 0 64k", "write -z 4M 4096")},
		{name: "v2 zero and discard", opts: "compat=0.10", size: "8M", cmds: append(pattern,
			"write -z 1M 64k", "discard 0 64k")},
		{name: "compressed zlib", opts: "", size: "4M", cmds: []string{
			"write -c -P 0x55 0 64k", "write -c -P 0x66 64k 64k", "write -P 0x77 200k 10k",
			"write -c -P 0x88 1M 64k", "write -P 0x99 1M 100"}},
		{name: "compressed zstd", opts: "compression_type=zstd", size: "4M", cmds: []string{
			"write -c -P 0x55 0 64k", "write -c -P 0x66 64k 64k", "write -c -P 0x88 1M 64k"}},
		{name: "compressed 512", opts: "cluster_size=512", size: "1M", cmds: []string{
			"write -c -P 0x55 0 512", "write -c -P 0x66 512 512", "write -c -P 0x88 8k 512"}},
		{name: "extended l2", opts: "extended_l2=on", size: "4M", cmds: []string{
			"write -P 1 4k 4k", "write -z 16k 4k", "write -P 2 70k 1k", "write -c -P 3 1M 64k",
			"write -P 4 2M 64k", "write -z -u 2M 8k", "discard 3M 64k"}},
		{name: "extended l2 backing", opts: "extended_l2=on", size: "4M",
			backing: "write -P 0xaa 0 4M", cmds: []string{"write -P 1 4k 4k", "write -z 16k 4k", "discard 128k 64k"}},
		{name: "backing", opts: "", size: "4M", backing: "write -P 0xaa 0 3M",
			cmds: []string{"write -P 1 10k 1k", "write -z 1M 64k", "discard 2M 64k"}},
		{name: "v2 backing", opts: "compat=0.10", size: "4M", backing: "write -P 0xaa 0 3M",
			cmds: []string{"write -P 1 10k 1k", "discard 2M 64k", "write -z 3M 64k"}},
		{name: "data file", opts: "data_file=DATA", size: "4M", cmds: pattern[:3]},
		{name: "data file raw", opts: "data_file=DATA,data_file_raw=on", size: "4M", cmds: pattern[:3]},
		{name: "metadata prealloc", opts: "preallocation=metadata", size: "4M", cmds: []string{"write -P 1 1M 64k"}},
		{name: "lazy refcounts", opts: "lazy_refcounts=on", size: "4M", cmds: pattern[:3]},
		{name: "unaligned size", opts: "", size: "1000k", cmds: []string{"write -P 9 960k 40k"}},
	}
}

// buildReadCase makes the image of c in dir and returns its path.
func buildReadCase(t *testing.T, dir string, c readCase) string {
	t.Helper()
	img := filepath.Join(dir, "img.qcow2")
	opts := strings.ReplaceAll(c.opts, "DATA", filepath.Join(dir, "data.raw"))
	args := []string{"create", "-q", "-f", "qcow2"}
	if c.backing != "" {
		back := filepath.Join(dir, "back.qcow2")
		execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", back, c.size)
		qemuIO(t, back, strings.Split(c.backing, ";")...)
		args = append(args, "-b", back, "-F", "qcow2")
	}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	execOut(t, "qemu-img", append(args, img, c.size)...)
	qemuIO(t, img, c.cmds...)
	return img
}

// TestReadMatchesQemu reads qemu-made images through the driver and
// compares them with qemu-img convert's raw output, and the chain's
// block status with qemu-img map.
func TestReadMatchesQemu(t *testing.T) {
	haveQemu(t)
	for _, c := range readCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			name := buildReadCase(t, dir, c)
			img := openImg(t, name, true)
			defer img.Close()
			got, want := readAll(t, img), rawOf(t, name)
			if i := diffOffset(got, want); i >= 0 {
				t.Fatalf("guest data differs at %#x", i)
			}
			// Unaligned reads at awkward places.
			for _, r := range [][2]int64{{1, 3}, {65535, 2}, {100*1024 - 7, 3100}, {1<<20 - 1, 1<<20 + 2}} {
				if r[0]+r[1] > int64(len(want)) {
					continue
				}
				buf := make([]byte, r[1])
				if _, err := img.ReadAt(buf, r[0]); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, want[r[0]:r[0]+r[1]]) {
					t.Errorf("read %d+%d differs", r[0], r[1])
				}
			}
			if !c.noMap {
				wantMap := execOut(t, "qemu-img", "map", "-U", "--output=json", name)
				if gotMap := mapJSON(t, img); gotMap != wantMap {
					t.Errorf("map differs:\ngot:\n%s\nwant:\n%s", gotMap, wantMap)
				}
			}
		})
	}
}

// TestReadPastEnd checks io.EOF semantics at the virtual end.
func TestReadPastEnd(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "e.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	img := openImg(t, name, true)
	defer img.Close()
	buf := make([]byte, 100)
	if n, err := img.ReadAt(buf, 1<<20-50); n != 50 || err == nil {
		t.Errorf("read across the end: %d, %v", n, err)
	}
	if n, err := img.ReadAt(buf, 1<<20); n != 0 || err == nil {
		t.Errorf("read at the end: %d, %v", n, err)
	}
	if _, err := os.Stat(name); err != nil {
		t.Fatal(err)
	}
}
