package qcow2

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	_ "github.com/imgfs/imgfs/formats/raw"
)

// qemuMeasure runs `qemu-img measure -O qcow2 --output=json` with args.
func qemuMeasure(t *testing.T, args ...string) formats.MeasureResult {
	t.Helper()
	out := execOut(t, "qemu-img", append([]string{"measure", "-O", "qcow2", "--output=json"}, args...)...)
	var r struct {
		Required       int64  `json:"required"`
		FullyAllocated int64  `json:"fully-allocated"`
		Bitmaps        *int64 `json:"bitmaps"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("qemu-img measure %q: %v\n%s", args, err, out)
	}
	res := formats.MeasureResult{Required: r.Required, FullyAllocated: r.FullyAllocated}
	if r.Bitmaps != nil {
		res.HasBitmaps, res.Bitmaps = true, *r.Bitmaps
	}
	return res
}

// ourMeasure measures with the driver: opts is a -o list, src an image
// file (or "").
func ourMeasure(t *testing.T, opts, src string) (*formats.MeasureResult, error) {
	t.Helper()
	o := formats.NewOptions(Driver.CreateSpecs())
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	var img formats.Image
	if src != "" {
		var err error
		if img, err = formats.Open(src, formats.OpenOptions{ReadOnly: true}); err != nil {
			t.Fatalf("open %s: %v", src, err)
		}
		defer img.Close()
	}
	return Driver.Measure(o, img)
}

func TestMeasureSizeMatchesQemu(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{
		"size=0", "size=1", "size=1G", "size=1000000", "size=1P",
		"size=1G,cluster_size=512", "size=1G,cluster_size=2M", "size=100G,cluster_size=4k",
		"size=1G,extended_l2=on", "size=1P,extended_l2=on", "size=10G,extended_l2=on,cluster_size=16k",
		"size=1G,refcount_bits=1", "size=100G,refcount_bits=64,cluster_size=512", "size=1G,refcount_bits=8",
		"size=1G,compat=0.10", "size=1G,compat=0.10,extended_l2=on",
		"size=1G,preallocation=metadata", "size=1G,preallocation=falloc", "size=1G,preallocation=full",
		"size=1G,backing_file=x", "size=1G,encryption=on", "size=1G,lazy_refcounts=on,compat=0.10",
	} {
		size, rest, _ := strings.Cut(opts, ",")
		args := []string{"--size", strings.TrimPrefix(size, "size=")}
		if rest != "" {
			args = append(args, "-o", rest)
		}
		want := qemuMeasure(t, args...)
		got, err := ourMeasure(t, opts, "")
		if err != nil || *got != want {
			t.Errorf("measure %s: got %+v, %v; qemu-img %+v", opts, got, err, want)
		}
	}
}

func TestMeasureErrors(t *testing.T) {
	for _, tc := range []struct{ opts, want string }{
		{"size=1G,cluster_size=3k", "Cluster size must be a power of two between 512 and 2048k"},
		{"size=1G,cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"},
		{"size=1G,extended_l2=on,cluster_size=8k", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
		{"size=1G,compat=1.2", "Invalid compatibility level: '1.2'"},
		{"size=1G,compat=v3", "Invalid compatibility level: 'v3'"},
		{"size=1G,refcount_bits=0", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"size=1G,refcount_bits=128", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"size=1G,refcount_bits=8,compat=0.10", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"},
		{"size=1G,preallocation=some", "invalid parameter value: some"},
		{"size=4E", "The image size is too large (try using a larger cluster size)"},
		{"size=2P,extended_l2=on", "The image size is too large (try using a larger cluster size)"},
	} {
		_, err := ourMeasure(t, tc.opts, "")
		if err == nil || err.Error() != tc.want {
			t.Errorf("measure %s: error %v, want %q", tc.opts, err, tc.want)
		}
	}
}

func TestMeasureSourceMatchesQemu(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	img := func(name, opts, size string) {
		execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p(name), size)
	}
	img("scattered.qcow2", "cluster_size=4k", "8M")
	qemuIO(t, p("scattered.qcow2"), "write -P 1 0 4k", "write -P 2 12k 4k", "write -z 100k 8k",
		"write -z -u 200k 4k", "write -P 3 1M 300k", "write -P 4 8188k 4k")
	execOut(t, "qemu-img", "convert", "-c", "-O", "qcow2", p("scattered.qcow2"), p("compressed.qcow2"))
	img("base.qcow2", "cluster_size=64k", "16M")
	qemuIO(t, p("base.qcow2"), "write -P 1 0 1M", "write -P 2 4M 64k")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", p("base.qcow2"), "-F", "qcow2", p("top.qcow2"), "32M")
	qemuIO(t, p("top.qcow2"), "write -z 0 64k", "write -P 5 8M 64k", "write -P 6 20M 4k")
	img("l2ext.qcow2", "extended_l2=on", "8M")
	qemuIO(t, p("l2ext.qcow2"), "write -P 1 0 4k", "write -P 2 40k 8k", "write -z 64k 2k", "write -P 3 1M 64k")
	img("meta.qcow2", "preallocation=metadata", "8M")
	qemuIO(t, p("meta.qcow2"), "write -P 1 64k 64k")
	img("v2.qcow2", "compat=0.10", "8M")
	qemuIO(t, p("v2.qcow2"), "write -P 1 64k 64k")
	img("bitmaps.qcow2", "cluster_size=64k", "100M")
	execOut(t, "qemu-img", "bitmap", "--add", p("bitmaps.qcow2"), "b0")
	execOut(t, "qemu-img", "bitmap", "--add", "-g", "512", p("bitmaps.qcow2"), "a-much-longer-bitmap-name")
	execOut(t, "qemu-img", "create", "-q", "-f", "raw", p("raw.img"), "4M")
	execOut(t, "qemu-io", "-f", "raw", "-c", "write -P 1 64k 4k", "-c", "write -P 2 1M 1M", p("raw.img"))

	for _, src := range []string{"scattered.qcow2", "compressed.qcow2", "top.qcow2", "l2ext.qcow2",
		"meta.qcow2", "v2.qcow2", "bitmaps.qcow2", "raw.img"} {
		for _, opts := range []string{"", "cluster_size=512", "cluster_size=2M", "cluster_size=16k",
			"compat=0.10", "backing_file=x", "preallocation=full", "extended_l2=on", "refcount_bits=1"} {
			args := []string{"-U", p(src)}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			want := qemuMeasure(t, args...)
			got, err := ourMeasure(t, opts, p(src))
			if err != nil || *got != want {
				t.Errorf("measure -o %q %s: got %+v, %v; qemu-img %+v", opts, src, got, err, want)
			}
		}
	}
}

func TestRefcountMetadataSize(t *testing.T) {
	for _, tc := range []struct {
		clusters, cs uint64
		order        uint
		want         uint64
	}{
		// One block and one table cluster count up to 32768 clusters.
		{16388, 65536, 4, 2 * 65536},
		{32766, 65536, 4, 2 * 65536},
		// The block and table clusters themselves need counting.
		{32767, 65536, 4, 3 * 65536},
		{0, 65536, 4, 0},
		// 512-byte clusters, 1-bit refcounts: 4096 per block.
		{4096, 512, 0, 3 * 512},
	} {
		if got := refcountMetadataSize(tc.clusters, tc.cs, tc.order); got != tc.want {
			t.Errorf("refcountMetadataSize(%d, %d, %d) = %d, want %d", tc.clusters, tc.cs, tc.order, got, tc.want)
		}
	}
}
