package tests

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
)

// step is one action that builds a fixture in dir with the reference
// tools.
type step func(t testing.TB, dir string)

func runSteps(t testing.TB, dir string, steps []step) {
	t.Helper()
	for _, s := range steps {
		s(t, dir)
	}
}

// qemuImgStep runs the real qemu-img.
func qemuImgStep(args ...string) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		mustRun(t, dir, qemuImg, args...)
	}
}

// create makes a qcow2 image with the given -o options ("" for none);
// extra goes before the file name (e.g. -b base -F qcow2). An empty size
// takes the backing file's.
func create(file, size, opts string, extra ...string) step {
	return createFormat("qcow2", file, size, opts, extra...)
}

// createFormat is create for any format qemu-img can create.
func createFormat(format, file, size, opts string, extra ...string) step {
	args := []string{"create", "-q", "-f", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(append(args, extra...), file)
	if size != "" {
		args = append(args, size)
	}
	return qemuImgStep(args...)
}

// overlay makes a qcow2 image backed by backing (of format backingFmt).
func overlay(file, backing, backingFmt, opts string) step {
	return create(file, "", opts, "-b", backing, "-F", backingFmt)
}

// createRaw makes a sparse raw image.
func createRaw(file, size string) step { return createFormat("raw", file, size, "") }

// qemuIO runs qemu-io commands ("write -P 0x11 0 64k", "discard 0 4k",
// ...) on file opened as format. qemu-io exits non-zero when one fails.
func qemuIO(format, file string, ops ...string) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		mustRun(t, dir, qemuIOPath, qemuIOArgs(format, file, ops...)...)
	}
}

func qemuIOArgs(format, file string, ops ...string) []string {
	args := []string{"-f", format}
	for _, op := range ops {
		args = append(args, "-c", op)
	}
	return append(args, file)
}

// crash runs qemu-io commands and then kills qemu-io with abort, leaving
// the image as a crashed VM would (e.g. dirty with lazy refcounts).
func crash(format, file string, ops ...string) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		r := run(t, dir, qemuIOPath, qemuIOArgs(format, file, append(ops, "abort")...)...)
		if r.code == 0 {
			t.Fatalf("qemu-io abort exited 0:\n%s%s", r.stdout, r.stderr)
		}
	}
}

// randomData writes n deterministic, incompressible bytes at off in the
// host file (a raw image), so compressed conversions meet clusters that
// do not compress.
func randomData(file string, off, n int64) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		buf := make([]byte, n)
		fillRandom(buf, uint64(off))
		f, err := os.OpenFile(filepath.Join(dir, file), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
}

// fillRandom fills buf from a generator seeded by seed.
func fillRandom(buf []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 0x696d676673))
	var word [8]byte
	for i := 0; i < len(buf); i += len(word) {
		binary.LittleEndian.PutUint64(word[:], r.Uint64())
		copy(buf[i:], word[:])
	}
}

// fill is the basic deterministic content of a matrix image of cluster
// size cs and virtual size size: a full cluster, a write inside one, one
// across a cluster boundary, a lone sector further on and the last
// sector of the image.
func fill(cs, size int64) []string {
	return []string{
		fmt.Sprintf("write -P 0x11 0 %d", cs),
		fmt.Sprintf("write -P 0x22 %d 4096", cs+512),
		fmt.Sprintf("write -P 0x33 %d 2048", 3*cs-1024),
		fmt.Sprintf("write -P 0x44 %d 512", 6*cs),
		fmt.Sprintf("write -P 0x55 %d 512", size-512),
	}
}

// zeroDiscard overwrites and drops parts of a 4 MiB image in every way
// qemu-io can: aligned and unaligned zero writes over data and over
// unallocated clusters, zero writes that may unmap, and discards.
var zeroDiscard = []string{
	"write -P 0x66 1M 512k",
	"write -z 1088k 64k",
	"write -z 1300k 10k",
	"write -z 2560k 128k",
	"write -z -u 1408k 64k",
	"discard 1216k 64k",
	"discard 1500k 3k",
}

// compressedWrites stores compressed clusters (64 KiB clusters), partly
// overwrites one (copy-on-write through decompression), zeroes one and
// discards one.
var compressedWrites = []string{
	"write -c -P 0x77 0 64k",
	"write -c -P 0x78 128k 128k",
	"write -P 0x79 160k 1k",
	"write -c -P 0x7a 1M 64k",
	"write -c -P 0x7b 2M 64k",
	"write -z 2M 64k",
	"write -c -P 0x7c 3M 64k",
	"discard 3M 64k",
	"write -c -P 0x7d 4032k 64k",
}

// rawSource is a raw image with compressible and incompressible
// clusters and holes, the source of the compressed conversions.
func rawSource(file string) []step {
	return []step{
		createRaw(file, "4M"),
		qemuIO("raw", file, fill(64*kib, 4*mib)...),
		randomData(file, 1*mib, 192*kib),
		randomData(file, 3*mib+100, 5000),
	}
}

// imageCase is one image of the differential matrix.
type imageCase struct {
	name  string
	steps []step
	// image is the file the commands inspect (default t.qcow2) and
	// format its format (default qcow2).
	image, format string
	// chain: the image has backing files; info --backing-chain is compared too.
	chain bool
	// big: the virtual size is too large to compare converted raw files
	// byte by byte.
	big bool
}

func (c imageCase) file() string {
	if c.image == "" {
		return "t.qcow2"
	}
	return c.image
}

func (c imageCase) fmt() string {
	if c.format == "" {
		return "qcow2"
	}
	return c.format
}

// matrix is the differential matrix: every qcow2 feature qemu-img 7.2
// writes, raw, and the variants of the other formats qemu-img creates,
// each image filled with a few deterministic writes.
func matrix() []imageCase {
	const size = 4 * mib
	plain := func(name, opts string, ops ...string) imageCase {
		return imageCase{name: name, steps: []step{
			create("t.qcow2", "4M", opts),
			qemuIO("qcow2", "t.qcow2", append(fill(64*kib, size), ops...)...),
		}}
	}
	return []imageCase{
		{name: "cluster-512", steps: []step{
			create("t.qcow2", "4M", "cluster_size=512"),
			qemuIO("qcow2", "t.qcow2", append(fill(512, size), zeroDiscard...)...),
		}},
		plain("cluster-64k", ""),
		{name: "cluster-2M", steps: []step{
			create("t.qcow2", "16M", "cluster_size=2M"),
			qemuIO("qcow2", "t.qcow2", append(fill(2*mib, 16*mib), zeroDiscard...)...),
		}},
		plain("compat-0.10", "compat=0.10", zeroDiscard...),
		plain("compat-1.1", "compat=1.1", zeroDiscard...),
		{name: "compressed-deflate-qemu-io", steps: []step{
			create("t.qcow2", "4M", ""),
			qemuIO("qcow2", "t.qcow2", compressedWrites...),
		}},
		{name: "compressed-zstd-qemu-io", steps: []step{
			create("t.qcow2", "4M", "compression_type=zstd"),
			qemuIO("qcow2", "t.qcow2", compressedWrites...),
		}},
		{name: "compressed-compat-0.10", steps: []step{
			create("t.qcow2", "4M", "compat=0.10"),
			qemuIO("qcow2", "t.qcow2", compressedWrites...),
		}},
		{name: "compressed-deflate-convert", steps: append(rawSource("src.raw"),
			qemuImgStep("convert", "-c", "-O", "qcow2", "src.raw", "t.qcow2"))},
		{name: "compressed-zstd-convert", steps: append(rawSource("src.raw"),
			qemuImgStep("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "t.qcow2"))},
		{name: "compressed-cluster-512-convert", steps: append(rawSource("src.raw"),
			qemuImgStep("convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", "src.raw", "t.qcow2"))},
		{name: "compressed-cluster-2M-convert", steps: append(rawSource("src.raw"),
			qemuImgStep("convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M", "src.raw", "t.qcow2"))},
		plain("extended-l2", "extended_l2=on",
			"write -P 0x12 70k 2k", "write -P 0x13 75k 3k", "write -z 80k 4k",
			"write -z 128k 64k", "discard 70k 2k", "write -P 0x14 200k 64k", "write -z 1M 6k"),
		{name: "extended-l2-backing", chain: true, steps: []step{
			create("base.qcow2", "4M", ""),
			qemuIO("qcow2", "base.qcow2", "write -P 0xaa 0 1M"),
			overlay("t.qcow2", "base.qcow2", "qcow2", "extended_l2=on"),
			qemuIO("qcow2", "t.qcow2", "write -P 0x11 4k 2k", "write -z 10k 2k",
				"write -P 0x22 100k 1k", "write -z 192k 64k", "discard 512k 64k",
				"write -P 0x33 2M 6k"),
		}},
		plain("lazy-refcounts", "lazy_refcounts=on"),
		{name: "lazy-refcounts-dirty", steps: []step{
			create("t.qcow2", "4M", "lazy_refcounts=on"),
			qemuIO("qcow2", "t.qcow2", fill(64*kib, size)...),
			crash("qcow2", "t.qcow2", "write -P 0x99 1M 128k"),
		}},
		plain("refcount-bits-1", "refcount_bits=1", zeroDiscard...),
		plain("refcount-bits-16", "refcount_bits=16"),
		plain("refcount-bits-64", "refcount_bits=64", zeroDiscard...),
		{name: "backing-chain-3", chain: true, steps: []step{
			create("base.qcow2", "4M", ""),
			qemuIO("qcow2", "base.qcow2", append(fill(64*kib, size), "write -P 0xa1 2M 1M")...),
			overlay("mid.qcow2", "base.qcow2", "qcow2", ""),
			qemuIO("qcow2", "mid.qcow2", "write -P 0xb1 64k 128k", "write -z 2M 64k", "write -P 0xb2 3M 4k"),
			overlay("t.qcow2", "mid.qcow2", "qcow2", ""),
			qemuIO("qcow2", "t.qcow2", "write -P 0xc1 0 4k", "write -z 2112k 64k",
				"discard 2176k 64k", "write -P 0xc2 3076k 2k"),
		}},
		{name: "backing-raw-base", chain: true, steps: []step{
			createRaw("base.raw", "4M"),
			qemuIO("raw", "base.raw", fill(64*kib, size)...),
			overlay("t.qcow2", "base.raw", "raw", ""),
			qemuIO("qcow2", "t.qcow2", "write -P 0xc1 1k 4k", "write -z 0 64k", "write -P 0xc2 1M 64k"),
		}},
		{name: "backing-compressed", chain: true, steps: []step{
			create("base.qcow2", "4M", ""),
			qemuIO("qcow2", "base.qcow2", compressedWrites...),
			overlay("t.qcow2", "base.qcow2", "qcow2", ""),
			qemuIO("qcow2", "t.qcow2", "write -P 0xb1 1k 2k", "write -P 0xb2 130k 4k", "write -z 1M 4k"),
		}},
		{name: "backing-shorter", chain: true, steps: []step{
			create("base.qcow2", "1M", ""),
			qemuIO("qcow2", "base.qcow2", "write -P 0xa1 960k 64k"),
			create("t.qcow2", "4M", "", "-b", "base.qcow2", "-F", "qcow2"),
			qemuIO("qcow2", "t.qcow2", "write -P 0xb1 2M 4k", "write -P 0xb2 1000k 8k"),
		}},
		{name: "snapshots", steps: []step{
			create("t.qcow2", "4M", ""),
			qemuIO("qcow2", "t.qcow2", fill(64*kib, size)...),
			qemuImgStep("snapshot", "-c", "first", "t.qcow2"),
			qemuIO("qcow2", "t.qcow2", "write -P 0x99 0 4k", "discard 64k 64k"),
			qemuImgStep("snapshot", "-c", "second", "t.qcow2"),
			qemuIO("qcow2", "t.qcow2", "write -P 0x9a 1M 64k"),
		}},
		plain("data-file", "data_file=t.data"),
		plain("data-file-raw", "data_file=t.data,data_file_raw=on", zeroDiscard...),
		{name: "empty", steps: []step{create("t.qcow2", "4M", "")}},
		{name: "size-0", steps: []step{create("t.qcow2", "0", "")}},
		{name: "size-unaligned", steps: []step{
			create("t.qcow2", "4194816", ""),
			qemuIO("qcow2", "t.qcow2", fill(64*kib, 4194816)...),
		}},
		{name: "size-1T-sparse", big: true, steps: []step{
			create("t.qcow2", "1T", ""),
			qemuIO("qcow2", "t.qcow2", "write -P 0x11 0 64k", "write -P 0x22 512G 4k",
				"write -P 0x33 1099511562240 65536"),
		}},
		{name: "raw", image: "t.raw", format: "raw", steps: []step{
			createRaw("t.raw", "4M"),
			qemuIO("raw", "t.raw", append(fill(64*kib, size), "write -z 1M 64k")...),
		}},
		other("vmdk", "t.vmdk", ""),
		other("vmdk", "t.vmdk", "subformat=monolithicFlat"),
		other("vmdk", "t.vmdk", "subformat=twoGbMaxExtentSparse"),
		other("vmdk", "t.vmdk", "zeroed_grain=on"),
		{name: "vmdk-streamOptimized", image: "t.vmdk", format: "vmdk", steps: append(rawSource("src.raw"),
			qemuImgStep("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.raw", "t.vmdk"))},
		other("vdi", "t.vdi", ""),
		other("vdi", "t.vdi", "static=on"),
		other("vpc", "t.vhd", ""),
		other("vpc", "t.vhd", "subformat=fixed"),
		other("vhdx", "t.vhdx", ""),
		other("vhdx", "t.vhdx", "subformat=fixed"),
		other("parallels", "t.hds", ""),
	}
}

// other is a 4 MiB image of another format that qemu-img creates, with
// creation options opts, filled by qemu-io with data and zero writes.
func other(format, file, opts string) imageCase {
	name := format
	if opts != "" {
		name += "-" + opts
	}
	return imageCase{name: name, image: file, format: format, steps: []step{
		createFormat(format, file, "4M", opts),
		qemuIO(format, file, append(fill(64*kib, 4*mib), "write -z 1M 64k")...),
	}}
}
