package tests

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// imageOptsFixtures are the files every --image-opts case starts with.
var imageOptsFixtures = []step{
	create("q.qcow2", "4M", ""),
	qemuIO("qcow2", "q.qcow2", "write -P 0x11 0 64k", "write -P 0x22 1M 64k"),
	create("q010.qcow2", "1M", "compat=0.10"),
	create("lazy.qcow2", "4M", "lazy_refcounts=on"),
	create("src.qcow2", "2M", ""),
	// An image with an external data file, and another data file for
	// it with different content.
	create("ext.qcow2", "4M", "data_file=ext.data"),
	qemuIO("qcow2", "ext.qcow2", "write -P 0x31 0 64k"),
	createRaw("alt.data", "4M"),
	qemuIO("raw", "alt.data", "write -P 0x32 0 128k"),
	qemuIO("qcow2", "src.qcow2", "write -P 0x77 0 1M", "write -P 0x78 1536k 4k"),
	createRaw("r.raw", "8M"),
	qemuIO("raw", "r.raw", "write -P 0x33 1M 64k", "write -P 0x44 3M 4k", "write -P 0x55 6M 1k"),
	createRaw("w.raw", "8M"),
	qemuIO("raw", "w.raw", "write -P 0x66 0 8M"),
	createFormat("parallels", "p.hds", "16M", ""),
	qemuIO("parallels", "p.hds", "write -P 0x12 2M 64k"),
	createFormat("parallels", "pw.hds", "16M", ""),
	// A VHD sized one way by its geometry and another by its current
	// size, made by a creator (Hyper-V) that QEMU sizes by the current
	// size; and one by Virtual PC, sized by the geometry.
	createFormat("vpc", "hyperv.vhd", "32M", ""),
	vhdFooter("hyperv.vhd", "win ", 30<<20),
	createFormat("vpc", "vpc.vhd", "32M", "subformat=fixed"),
	vhdFooter("vpc.vhd", "vpc ", 30<<20),
}

// vhdFooter rewrites the creator application and current size of a VHD
// footer (both copies of a dynamic disk's) and fixes its checksum.
func vhdFooter(file, app string, currentSize uint64) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		name := filepath.Join(dir, file)
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range []int{0, len(data) - 512} {
			ft := data[off : off+512]
			if !bytes.HasPrefix(ft, []byte("conectix")) {
				continue
			}
			copy(ft[28:32], app)
			binary.BigEndian.PutUint64(ft[48:], currentSize)
			binary.BigEndian.PutUint32(ft[64:], 0)
			var sum uint32
			for _, b := range ft[:85] {
				sum += uint32(b)
			}
			binary.BigEndian.PutUint32(ft[64:], ^sum)
		}
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// imageOptsCase is one command line; files are the fixtures it may
// change, which must end up byte for byte the same as qemu-img leaves
// them.
type imageOptsCase struct {
	args  []string
	files []string
}

func optsCase(args ...string) imageOptsCase { return imageOptsCase{args: args} }

func (c imageOptsCase) changing(files ...string) imageOptsCase {
	c.files = files
	return c
}

const window = "driver=raw,offset=1M,size=4M,file.filename=r.raw"

var imageOptsCases = []imageOptsCase{
	// The generic mechanism: unknown options, bad values, options for
	// a probed driver.
	optsCase("info", "--image-opts", "driver=parallels,foo=1,file.filename=p.hds"),
	optsCase("info", "--image-opts", "file.filename=q.qcow2,bogus=1"),
	optsCase("info", "--image-opts", "file.filename=nope.qcow2,bogus=1"),
	optsCase("info", "--image-opts", "driver=qcow2,bogus=1"),
	optsCase("info", "--image-opts", "driver=qcow2,discard-no-unref=on,file.filename=q.qcow2"),
	// parallels
	optsCase("info", "--image-opts", "driver=parallels,prealloc-mode=truncate,prealloc-size=1M,file.filename=p.hds"),
	optsCase("info", "--image-opts", "driver=parallels,prealloc-mode=x,file.filename=p.hds"),
	optsCase("info", "--image-opts", "driver=parallels,prealloc-size=x,file.filename=p.hds"),
	optsCase("info", "--image-opts", "driver=parallels,prealloc-size=x,prealloc-mode=x,file.filename=p.hds"),
	optsCase("info", "--image-opts", "file.filename=p.hds,prealloc-mode=falloc"),
	optsCase("map", "--output=json", "--image-opts", "driver=parallels,prealloc-mode=truncate,file.filename=p.hds"),
	optsCase("check", "--image-opts", "driver=parallels,prealloc-mode=truncate,file.filename=p.hds"),
	optsCase("convert", "-n", "src.qcow2", "--target-image-opts", "driver=parallels,prealloc-mode=truncate,file.filename=pw.hds").changing("pw.hds"),
	optsCase("convert", "-n", "src.qcow2", "--target-image-opts", "driver=parallels,prealloc-size=4M,file.filename=pw.hds").changing("pw.hds"),
	// vpc
	optsCase("info", "--image-opts", "driver=vpc,file.filename=hyperv.vhd"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=hyperv.vhd"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=current_size,file.filename=hyperv.vhd"),
	optsCase("info", "--output=json", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=hyperv.vhd"),
	optsCase("info", "--image-opts", "file.filename=hyperv.vhd,force_size_calc=chs"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=chs,force_size_calc=current_size,file.filename=hyperv.vhd"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=current_size,file.filename=vpc.vhd"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=x,file.filename=hyperv.vhd"),
	optsCase("info", "--image-opts", "driver=vpc,force_size_calc=,file.filename=hyperv.vhd"),
	optsCase("map", "--output=json", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=hyperv.vhd"),
	optsCase("compare", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=hyperv.vhd", "driver=vpc,file.filename=hyperv.vhd"),
	optsCase("compare", "-s", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=hyperv.vhd", "driver=vpc,file.filename=hyperv.vhd"),
	// raw windows
	optsCase("info", "--image-opts", window),
	optsCase("info", "--output=json", "--image-opts", window),
	optsCase("info", "--image-opts", "driver=raw,offset=1M,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,offset=100,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,offset=8M,file.filename=r.raw"),
	optsCase("info", "--image-opts", "file.filename=r.raw,offset=1M"),
	optsCase("info", "--image-opts", "driver=raw,offset=9M,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,size=9M,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,offset=1M,size=8M,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,size=1000,file.filename=r.raw"),
	optsCase("info", "--image-opts", "driver=raw,offset=x,file.filename=r.raw"),
	optsCase("map", "--image-opts", window),
	optsCase("map", "--output=json", "--image-opts", window),
	optsCase("map", "--output=json", "--image-opts", "driver=raw,offset=1000k,file.filename=r.raw"),
	optsCase("check", "--image-opts", window),
	optsCase("measure", "-O", "qcow2", "--image-opts", window),
	optsCase("compare", "--image-opts", window, "driver=raw,size=4M,file.filename=r.raw"),
	optsCase("compare", "--image-opts", window, "driver=raw,offset=1M,size=4M,file.filename=w.raw"),
	optsCase("convert", "-O", "raw", "--image-opts", window, "out.raw"),
	optsCase("convert", "-O", "qcow2", "--image-opts", window, "out.qcow2"),
	optsCase("dd", "--image-opts", "if=driver=raw,offset=1M,file.filename=r.raw", "of=dd.raw", "bs=64k", "count=40"),
	optsCase("dd", "--image-opts", "if=driver=raw,offset=1M,file.filename=r.raw", "of=driver=raw,offset=2M,file.filename=w.raw", "bs=64k", "count=20").changing("w.raw"),
	optsCase("convert", "-n", "src.qcow2", "--target-image-opts", "driver=raw,offset=2M,size=2M,file.filename=w.raw").changing("w.raw"),
	optsCase("convert", "-n", "src.qcow2", "--target-image-opts", "driver=raw,offset=7M,file.filename=w.raw").changing("w.raw"),
	optsCase("resize", "--image-opts", "driver=raw,offset=1M,size=4M,file.filename=w.raw", "5M").changing("w.raw"),
	optsCase("resize", "--image-opts", "driver=raw,offset=1M,file.filename=w.raw", "10M").changing("w.raw"),
	optsCase("resize", "--image-opts", "driver=raw,offset=1M,file.filename=w.raw", "5M").changing("w.raw"),
	optsCase("resize", "--shrink", "--image-opts", "driver=raw,offset=1M,file.filename=w.raw", "5M").changing("w.raw"),
	// qcow2
	optsCase("info", "--image-opts", "driver=qcow2,lazy-refcounts=on,pass-discard-request=on,pass-discard-snapshot=off,pass-discard-other=on,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,overlap-check=none,overlap-check.inactive-l2=on,cache-clean-interval=0,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-size=1M,l2-cache-size=512k,l2-cache-entry-size=4k,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,lazy-refcounts=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,lazy-refcounts=on,file.filename=q010.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,overlap-check=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,overlap-check.template=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,overlap-check=all,overlap-check.template=none,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,overlap-check.main-header=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-size=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-size=1M,l2-cache-size=2M,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-size=1M,refcount-cache-size=2M,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-size=1M,l2-cache-size=1M,refcount-cache-size=1M,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,l2-cache-entry-size=1000,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,l2-cache-entry-size=128k,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-clean-interval=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache-clean-interval=-1,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,encrypt.format=aes,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=q.qcow2"),
	optsCase("check", "--output=json", "--image-opts", "driver=qcow2,lazy-refcounts=off,file.filename=lazy.qcow2"),
	optsCase("map", "--image-opts", "driver=qcow2,l2-cache-size=64k,file.filename=q.qcow2"),
	optsCase("convert", "-O", "raw", "--image-opts", "driver=qcow2,overlap-check=all,file.filename=q.qcow2", "out.raw"),
	optsCase("map", "--output=json", "--image-opts", "driver=qcow2,data-file.filename=alt.data,file.filename=ext.qcow2"),
	optsCase("convert", "-O", "raw", "--image-opts", "driver=qcow2,data-file.driver=file,data-file.filename=alt.data,file.filename=ext.qcow2", "out.raw"),
	optsCase("info", "--image-opts", "driver=qcow2,data-file.filename=nope,file.filename=ext.qcow2"),
	optsCase("map", "--image-opts", "driver=qcow2,data-file.filename=nope,file.filename=ext.qcow2"),
	optsCase("map", "--image-opts", "driver=qcow2,data-file.filename=alt.data,file.filename=q.qcow2"),
	optsCase("map", "--image-opts", "driver=qcow2,data-file.driver=file,file.filename=ext.qcow2"),
	optsCase("map", "--image-opts", "driver=qcow2,data-file=node0,file.filename=ext.qcow2"),
	optsCase("map", `json:{"driver":"qcow2","data-file":{"filename":"alt.data"},"file":{"filename":"ext.qcow2"}}`),
	// The file protocol and the generic node options.
	optsCase("info", "--image-opts", "driver=qcow2,file.locking=off,file.aio=threads,file.aio-max-batch=4,file.drop-cache=off,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.locking=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.aio=y,file.locking=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.aio=native,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.aio=native,file.cache.direct=on,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.aio=native,cache.direct=on,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.aio-max-batch=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.drop-cache=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.pr-manager=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.locking=x,file.filename=nope.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.x=1,file.filename=nope.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.cache.direct=on,file.cache.no-flush=on,file.node-name=f,node-name=n,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.node-name=a,node-name=a,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.node-name=1x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,node-name=1x,lazy-refcounts=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,discard=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,discard=x,file.filename=nope.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.discard=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,detect-zeroes=unmap,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,detect-zeroes=unmap,discard=on,auto-read-only=on,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.detect-zeroes=unmap,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,detect-zeroes=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,cache.no-flush=x,file.filename=q.qcow2"),
	optsCase("info", "--image-opts", "driver=qcow2,file.force-share=on,file.filename=q.qcow2"),
	optsCase("check", "-r", "all", "--image-opts", "driver=qcow2,file.force-share=on,file.filename=q.qcow2"),
	optsCase("check", "-r", "all", "--image-opts", "driver=qcow2,file.read-only=on,file.filename=q.qcow2"),
	optsCase("check", "--image-opts", "driver=qcow2,file.read-only=on,file.filename=q.qcow2"),
	optsCase("resize", "--image-opts", "driver=qcow2,file.read-only=on,file.filename=q.qcow2", "8M").changing("q.qcow2"),
	optsCase("compare", "--image-opts", "driver=qcow2,file.locking=off,file.filename=q.qcow2", "driver=qcow2,file.locking=on,file.filename=q.qcow2"),
	// json: file names carry the same options, typed.
	optsCase("info", `json:{"driver":"qcow2","file":{"driver":"file","filename":"q.qcow2"}}`),
	optsCase("info", `json:{"driver":"raw","offset":1048576,"size":"4M","file":{"driver":"file","filename":"r.raw"}}`),
	optsCase("info", "--output=json", `json:{"driver":"raw","offset":"1M","size":4194304,"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","offset":1048576,"file.filename":"r.raw"}`),
	optsCase("info", `json:{"file":{"filename":"hyperv.vhd"},"force_size_calc":"chs"}`),
	optsCase("info", "-f", "raw", `json:{"driver":"qcow2","offset":1048576,"file.filename":"r.raw"}`),
	optsCase("info", `json:{"driver":"raw","offset":null,"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","offset":true,"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","offset":1.5,"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","offset":[1],"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","offset":1,"offset":2,"file":{"filename":"r.raw"}}`),
	optsCase("info", `json:{"driver":"raw","file":"r.raw"}`),
	optsCase("info", `json:{"driver":"qcow2","lazy-refcounts":true,"file":{"filename":"q.qcow2","locking":"off"}}`),
	optsCase("info", `json:{"driver":"qcow2","lazy-refcounts":1,"file":{"filename":"q.qcow2"}}`),
	optsCase("info", "json:{}"),
	optsCase("info", "json:"),
	optsCase("info", "json:[1]"),
	optsCase("info", `json:{"driver":"raw","file":{"filename":"r.raw"}} x`),
	optsCase("map", "--output=json", `json:{"driver":"raw","offset":"1M","size":"4M","file":{"filename":"r.raw"}}`),
	optsCase("convert", "-O", "raw", `json:{"driver":"raw","offset":"1M","size":"4M","file":{"filename":"r.raw"}}`, "out.raw"),
	optsCase("convert", "-n", "src.qcow2", `json:{"driver":"raw","offset":"2M","size":"2M","file":{"filename":"w.raw"}}`).changing("w.raw"),
}

// TestImageOpts runs each case with qemu-img and with imgfs, each in its
// own copy of the fixtures, and requires the same stdout, stderr and
// exit code, the same files afterwards, the changed ones byte for byte
// alike, and images created alike.
func TestImageOpts(t *testing.T) {
	template := t.TempDir()
	runSteps(t, template, imageOptsFixtures)
	for _, c := range imageOptsCases {
		t.Run(testName(c.args), func(t *testing.T) {
			t.Parallel()
			refDir, ourDir, refFiles := runBothIn(t, template, c.args...)
			for _, f := range c.files {
				a, _ := os.ReadFile(filepath.Join(refDir, f))
				b, _ := os.ReadFile(filepath.Join(ourDir, f))
				if !bytes.Equal(a, b) {
					t.Errorf("%s differs afterwards (%d and %d bytes), first at byte %d", f, len(a), len(b), firstByteDiff(a, b))
				}
			}
			for _, f := range refFiles {
				if slices.Contains(listDir(t, template), f) {
					continue
				}
				if w, g := describeCreated(t, refDir, f), describeCreated(t, ourDir, f); w != g {
					t.Errorf("created %s differs:\n--- qemu-img made:\n%s--- imgfs made:\n%s", f, w, g)
				}
			}
		})
	}
}

// TestImageOptsLockingOff: file.locking=off opens an image that a
// running qemu-io holds for writing, which the default locking refuses.
func TestImageOptsLockingOff(t *testing.T) {
	dir := t.TempDir()
	runSteps(t, dir, []step{create("busy.qcow2", "1M", "")})
	holdImage(t, dir, "qcow2", "busy.qcow2")
	for _, args := range [][]string{
		{"info", "--image-opts", "driver=qcow2,file.filename=busy.qcow2"},
		{"info", "--image-opts", "driver=qcow2,file.locking=off,file.filename=busy.qcow2"},
		{"info", "--image-opts", "driver=qcow2,file.locking=auto,file.filename=busy.qcow2"},
		{"map", "--image-opts", "driver=qcow2,file.locking=off,file.filename=busy.qcow2"},
		{"check", "--image-opts", "driver=qcow2,file.locking=off,file.filename=busy.qcow2"},
	} {
		differential(t, dir, args...)
	}
}
