package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestCreateMatchesQemu creates each option combination with qemu-img
// and with this driver and requires byte-identical files (data files
// included) and a clean qemu-img check.
func TestCreateMatchesQemu(t *testing.T) {
	haveQemu(t)
	cases := []struct{ opts, size string }{
		{opts: "", size: "1G"},
		{opts: "", size: "1000"},
		{opts: "", size: "0"},
		{opts: "compat=0.10", size: "1G"},
		{opts: "compat=v2", size: "100M"},
		{opts: "cluster_size=512", size: "1G"},
		{opts: "cluster_size=512,refcount_bits=64", size: "1G"},
		{opts: "cluster_size=4k,refcount_bits=1", size: "3G"},
		{opts: "cluster_size=2M", size: "1G"},
		{opts: "cluster_size=2M,extended_l2=on", size: "5G"},
		{opts: "extended_l2=on,cluster_size=16k", size: "1G"},
		{opts: "refcount_bits=1", size: "1G"},
		{opts: "refcount_bits=8", size: "1G"},
		{opts: "refcount_bits=32", size: "10G"},
		{opts: "lazy_refcounts=on", size: "1G"},
		{opts: "compression_type=zstd", size: "1G"},
		{opts: "preallocation=metadata,cluster_size=4k", size: "5M"},
		{opts: "preallocation=metadata,cluster_size=512,refcount_bits=64", size: "2M"},
		{opts: "preallocation=falloc,cluster_size=1k,refcount_bits=64", size: "6M"},
		{opts: "preallocation=metadata,extended_l2=on", size: "20M"},
		{opts: "preallocation=falloc", size: "20M"},
		{opts: "preallocation=full", size: "4M"},
		{opts: "preallocation=falloc,cluster_size=4k", size: "20M"},
		{opts: "preallocation=full,cluster_size=512,refcount_bits=64", size: "1M"},
		{opts: "data_file=DATA", size: "10M"},
		{opts: "data_file=DATA,data_file_raw=on", size: "10M"},
		{opts: "data_file=DATA,preallocation=metadata", size: "10M"},
		{opts: "backing_file=BACK,backing_fmt=raw", size: "1M"},
		{opts: "backing_file=BACK,backing_fmt=raw,compat=0.10", size: "1M"},
		{opts: "backing_file=BACK,backing_fmt=raw,extended_l2=on,preallocation=metadata", size: "1M"},
		{opts: "nocow=on,extent_size_hint=1M", size: "1M"},
	}
	dir := t.TempDir()
	back := filepath.Join(dir, "back.raw")
	if err := os.WriteFile(back, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.opts, ",", "+")+"/"+c.size, func(t *testing.T) {
			img := filepath.Join(dir, "img.qcow2")
			data := filepath.Join(dir, "data.raw")
			opts := strings.NewReplacer("DATA", data, "BACK", back).Replace(c.opts)
			args := []string{"create", "-q", "-f", "qcow2"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			execOut(t, "qemu-img", append(args, img, c.size)...)
			want, _ := os.ReadFile(img)
			wantData, _ := os.ReadFile(data)
			os.Remove(img)
			os.Remove(data)
			if err := createOpts(t, img, strings.Trim(opts+",size="+c.size, ",")); err != nil {
				t.Fatalf("create: %v", err)
			}
			got, _ := os.ReadFile(img)
			gotData, _ := os.ReadFile(data)
			if i := diffOffset(got, want); !bytes.Equal(got, want) {
				t.Errorf("image differs from qemu-img's at byte %#x (sizes %d, %d)", i, len(got), len(want))
			}
			if i := diffOffset(gotData, wantData); !bytes.Equal(gotData, wantData) {
				t.Errorf("data file differs from qemu-img's at byte %#x", i)
			}
			mustBeClean(t, img)
			os.Remove(img)
			os.Remove(data)
		})
	}
}

// TestCreateErrors checks option validation against QEMU's messages.
func TestCreateErrors(t *testing.T) {
	cases := []struct{ opts, want string }{
		{"cluster_size=1000", "Cluster size must be a power of two between 512 and 2048k"},
		{"cluster_size=4M", "Cluster size must be a power of two between 512 and 2048k"},
		{"refcount_bits=3", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"refcount_bits=0", "Refcount width must be a power of two and may not exceed 64 bits"},
		{"compat=0.9", "Parameter 'version' does not accept value '0.9'"},
		{"compat=0.10,lazy_refcounts=on", "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"compat=0.10,refcount_bits=8", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"},
		{"compat=0.10,extended_l2=on,cluster_size=1000", "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"extended_l2=on,cluster_size=1000", "Cluster size must be a power of two between 512 and 2048k"},
		{"extended_l2=on,cluster_size=8k", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
		{"compat=0.10,compression_type=zstd", "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"compression_type=lz4", "Parameter 'compression-type' does not accept value 'lz4'"},
		{"preallocation=foo,compression_type=lz4", "Parameter 'preallocation' does not accept value 'foo'"},
		{"preallocation=foo,compat=0.9", "Parameter 'version' does not accept value '0.9'"},
		{"data_file_raw=on", "data-file-raw requires data-file"},
		{"compat=0.10,data_file=x", "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{"backing_file=b,backing_fmt=raw,preallocation=metadata", "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
		{"backing_fmt=raw,lazy_refcounts=on,compat=0.10", "Backing format cannot be used without backing file"},
		{"backing_file=b,backing_fmt=raw,data_file=x,data_file_raw=on", "Backing file and data-file-raw cannot be used at the same time"},
		{"cluster_size=512,size=137438953984", "The image size is too large for file format 'qcow2' (try using a larger cluster size)"},
		{"encrypt.format=luks", "Parameter 'encrypt.key-secret' is required for cipher"},
	}
	dir := t.TempDir()
	for _, c := range cases {
		name := filepath.Join(dir, "e.qcow2")
		opts := c.opts
		if !strings.Contains(","+opts, ",size=") {
			opts += ",size=1M"
		}
		err := createOpts(t, name, opts)
		if err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want %q", c.opts, err, c.want)
		}
		if _, err := os.Stat(name); err == nil {
			t.Errorf("%s: failed creation left the file behind", c.opts)
		}
	}
}

// TestWriteLayoutMatchesQemu applies the same writes, zero writes and
// discards with qemu-io and with the driver to copies of one image:
// allocation order, refcount block placement and refcount table growth
// must give identical files.
func TestWriteLayoutMatchesQemu(t *testing.T) {
	haveQemu(t)
	type op struct {
		kind     string // "write", "zero", "zero-unmap", "discard"
		off, len int64
	}
	cases := []struct {
		opts    string
		ops     []op
		backing bool     // on top of a backing file full of data
		pre     []string // qemu-io commands before the copies are made
	}{
		{opts: "compat=0.10", backing: true, ops: []op{{"write", 0, 100}, {"zero", 1 << 20, 1 << 20}, {"discard", 0, 64 << 10}, {"zero-unmap", 3 << 20, 64 << 10}}},
		{opts: "", backing: true, ops: []op{{"write", 0, 100}, {"zero", 1 << 20, 1 << 20}, {"discard", 0, 128 << 10}, {"zero-unmap", 3 << 20, 64 << 10}, {"write", 5 << 20, 70000}}},
		{opts: "extended_l2=on", backing: true, ops: []op{{"write", 0, 100}, {"zero", 1 << 20, 8192}, {"discard", 2 << 20, 128 << 10}, {"write", 5 << 20, 70000}}},
		{opts: "", pre: []string{"write -c -P 9 0 1M", "write -P 8 2M 1M"}, ops: []op{{"write", 100, 100}, {"zero", 64 << 10, 64 << 10}, {"discard", 2 << 20, 64 << 10}, {"write", 512 << 10, 128 << 10}}},
		{opts: "", ops: []op{{"write", 0, 1 << 20}, {"write", 5 << 20, 100000}, {"write", 3 << 20, 4096}, {"write", 100, 10},
			{"zero", 64 << 10, 128 << 10}, {"zero-unmap", 512 << 10, 64 << 10}, {"discard", 5 << 20, 1 << 20},
			{"zero", 8 << 20, 1 << 20}, {"zero", 1000, 3000}, {"write", 9<<20 + 5, 100}}},
		{opts: "cluster_size=512,refcount_bits=64", ops: []op{{"write", 0, 1536 << 10}, {"write", 4 << 20, 777}, {"discard", 1 << 20, 256 << 10}, {"write", 1 << 20, 4096}}},
		{opts: "cluster_size=4k,refcount_bits=1", ops: []op{{"write", 0, 1 << 20}, {"write", 9 << 20, 1 << 20}, {"write", 2 << 20, 3000}, {"zero-unmap", 0, 64 << 10}}},
		{opts: "extended_l2=on", ops: []op{{"write", 4096, 4096}, {"write", 1 << 20, 3 << 20}, {"zero", 2 << 20, 8192}, {"zero", 6 << 20, 2048},
			{"zero-unmap", 3 << 20, 128 << 10}, {"discard", 1 << 20, 64 << 10}}},
		{opts: "compat=0.10", ops: []op{{"write", 0, 1 << 20}, {"write", 7 << 20, 65536}, {"zero", 128 << 10, 64 << 10}, {"discard", 0, 64 << 10}}},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.opts, ",", "+"), func(t *testing.T) {
			dir := t.TempDir()
			a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			if c.backing {
				base := filepath.Join(dir, "base.qcow2")
				execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "10M")
				qemuIO(t, base, "write -P 0x77 0 10M")
				args = append(args, "-b", base, "-F", "qcow2")
			}
			execOut(t, "qemu-img", append(args, a, "10M")...)
			if len(c.pre) > 0 {
				qemuIO(t, a, c.pre...)
			}
			execOut(t, "cp", a, b)
			var cmds []string
			img := openImg(t, b, false)
			for i, o := range c.ops {
				r := " " + strconv.FormatInt(o.off, 10) + " " + strconv.FormatInt(o.len, 10)
				var err error
				switch o.kind {
				case "write":
					cmds = append(cmds, "write -P "+strconv.Itoa(i+1)+r)
					_, err = img.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, int(o.len)), o.off)
				case "zero":
					cmds = append(cmds, "write -z"+r)
					err = img.WriteZeroes(o.off, o.len, false)
				case "zero-unmap":
					cmds = append(cmds, "write -z -u"+r)
					err = img.WriteZeroes(o.off, o.len, true)
				case "discard":
					cmds = append(cmds, "discard"+r)
					err = img.Discard(o.off, o.len)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuIO(t, a, cmds...)
			want, _ := os.ReadFile(a)
			got, _ := os.ReadFile(b)
			if !bytes.Equal(got, want) {
				t.Errorf("differs from qemu-io's at %#x (sizes %d, %d)", diffOffset(got, want), len(got), len(want))
				t.Logf("qemu map:\n%sours:\n%s", execOut(t, "qemu-img", "map", "-U", "--output=json", a), execOut(t, "qemu-img", "map", "-U", "--output=json", b))
			}
			mustBeClean(t, b)
		})
	}
}
