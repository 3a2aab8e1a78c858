package qcow

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw"
)

func TestConformance(t *testing.T) {
	formatstest.Run(t, formatstest.Created("qcow", ""))
}

// qemuWrites are qemu-io commands writing data, zeroes and compressed
// clusters; the last cluster of a 5000k+512 image is partial.
var qemuWrites = []string{
	"write -P 1 0 4k", "write -P 2 5000 3000", "write -z 1M 64k",
	"write -c -P 3 2M 4k", "write -c 3M 4k", "write -P 4 3M 512",
	"write -c -P 5 2M 4k", "write -P 6 5000k 512",
}

// TestReadQemuImages reads images qemu-img made and qemu-io wrote and
// compares them with qemu-img's raw conversion, and info and map with
// qemu-img's.
func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "img.qcow")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", name, "5000.5k")
	formatstest.QemuIO(t, "qcow", name, qemuWrites...)
	// An overlay with a qcow backing file; qemu-img 7.2's convert -c -O
	// qcow fails, so compressed clusters come from qemu-io only.
	over := filepath.Join(dir, "over.qcow")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", "-b", "img.qcow", "-F", "qcow", over)
	formatstest.QemuIO(t, "qcow", over, "write -P 7 4095 2", "write -P 8 2M 1k")
	for _, n := range []string{name, over} {
		t.Run(filepath.Base(n), func(t *testing.T) {
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, n, formats.OpenOptions{Format: "qcow", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "qcow", n)
		})
	}
}

// TestCreateIdentical creates images with qemu-img and with us and
// compares the files byte for byte.
func TestCreateIdentical(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, c := range []struct{ opts, size string }{
		{"", "10M"}, {"", "1000"}, {"", "3G"},
		{"backing_file=base.raw,backing_fmt=raw", "5M"},
		{"preallocation=off", "1T"},
	} {
		t.Run(c.opts+"/"+c.size, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.qcow"), filepath.Join(dir, "theirs.qcow")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "5M")
			args := []string{"create", "-q", "-f", "qcow"}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			formatstest.Exec(t, "qemu-img", append(args, theirs, c.size)...)
			opts := "size=" + c.size
			if c.opts != "" {
				opts += "," + c.opts
			}
			if err := formatstest.Create(t, "qcow", ours, opts); err != nil {
				t.Fatal(err)
			}
			formatstest.SameFiles(t, ours, theirs)
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ opts, msg string }{
		{"size=0", "Image size is too small, cannot be zero length"},
		{"size=1M,backing_fmt=nosuch,backing_file=x", "unrecognized backing format 'nosuch'"},
		{"size=1M,encryption=on", "Parameter 'encrypt.key-secret' is required for cipher"},
		{"size=1M,encrypt.format=luks", "Unsupported encryption format"},
	} {
		err := formatstest.Create(t, "qcow", filepath.Join(dir, "x.qcow"), c.opts)
		if err == nil || err.Error() != c.msg {
			t.Errorf("%s: got %v, want %q", c.opts, err, c.msg)
		}
	}
	err := formatstest.Create(t, "qcow", filepath.Join(dir, "x.qcow"), "size=1M,encryption=on,encrypt.key-secret=s0")
	if err == nil || err.Error() != "No secret with id 's0'" {
		t.Errorf("encrypted create without the secret: %v", err)
	}
}

// TestWriteLikeQemu writes the same data with qemu-io into a qemu-img
// image and with our driver into ours: the files must be identical and
// qemu-img compare must find our image equal to the raw data.
func TestWriteLikeQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, backed := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "backed"}[backed], func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", base, "3M")
			formatstest.Exec(t, "qemu-io", "-f", "raw", "-c", "write -P 9 0 3M", base)
			theirs, ours := filepath.Join(dir, "theirs.qcow"), filepath.Join(dir, "ours.qcow")
			opts, qargs := "size=3M", []string{"create", "-q", "-f", "qcow", theirs, "3M"}
			if backed {
				opts += ",backing_file=base.raw,backing_fmt=raw"
				qargs = []string{"create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", theirs}
			}
			formatstest.Exec(t, "qemu-img", qargs...)
			if err := formatstest.Create(t, "qcow", ours, opts); err != nil {
				t.Fatal(err)
			}
			writes := []struct{ off, n int64 }{{5000, 3000}, {0, 512}, {2<<20 + 4096, 8192}, {1 << 20, 100}}
			var cmds []string
			img := formatstest.Open(t, ours, formats.OpenOptions{Format: "qcow"})
			for i, w := range writes {
				cmds = append(cmds, "write -P "+itoa(int64(i+1))+" "+itoa(w.off)+" "+itoa(w.n))
				if _, err := img.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, int(w.n)), w.off); err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			formatstest.QemuIO(t, "qcow", theirs, cmds...)
			// With 512-byte clusters QEMU writes sub-sector requests by
			// read-modify-write through the backing file, which imgfs
			// does not need; only the plain case is identical.
			if !backed {
				formatstest.SameFiles(t, ours, theirs)
			}
			formatstest.Exec(t, "qemu-img", "compare", "-U", ours, theirs)
			formatstest.SameInfoAndMap(t, "qcow", ours)
		})
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestCompressedWrites compresses clusters through CompressedWriter as
// convert -c does; qemu-img must read them back.
func TestCompressedWrites(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "c.qcow")
	if err := formatstest.Create(t, "qcow", name, "size=1000k"); err != nil {
		t.Fatal(err)
	}
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "qcow"})
	cw := img.(formats.CompressedWriter)
	unit := cw.CompressionUnit()
	want := make([]byte, img.Size())
	for i, off := range []int64{0, 3 * unit, 7 * unit, img.Size() &^ (unit - 1)} {
		n := min(unit, img.Size()-off)
		src := bytes.Repeat([]byte{byte(i + 1), 0, 0, byte(i)}, int(n/4))
		out, ok := cw.Compress(nil, src)
		if !ok {
			t.Fatalf("cluster %d did not compress", i)
		}
		if err := cw.WriteCompressed(off, out); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], src)
	}
	// Overwrite part of a compressed cluster: the rest must survive.
	if _, err := img.WriteAt([]byte("hello"), 3*unit+10); err != nil {
		t.Fatal(err)
	}
	copy(want[3*unit+10:], "hello")
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, img), want); i >= 0 {
		t.Fatalf("read back differs at %d", i)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if i := formatstest.FirstDiff(formatstest.QemuRaw(t, "qcow", name), want); i >= 0 {
		t.Fatalf("qemu-img reads differently at %d", i)
	}
	formatstest.SameInfoAndMap(t, "qcow", name)
}

// TestEncrypted reads an AES-encrypted image qemu-io wrote, writes it
// (unaligned, into new and allocated clusters) and has qemu-img read our
// writes; our encrypted create must equal qemu-img's.
func TestEncrypted(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "enc.qcow")
	const secret = "secret,id=s0,data=pw"
	formatstest.Exec(t, "qemu-img", "create", "-q", "--object", secret, "-f", "qcow",
		"-o", "encrypt.format=aes,encrypt.key-secret=s0", name, "1M")
	ours := filepath.Join(dir, "ours.qcow")
	o := formats.NewOptions(formats.Lookup("qcow").CreateSpecs())
	o.Secrets = map[string][]byte{"s0": []byte("pw")}
	if err := o.Parse("size=1M,encrypt.format=aes,encrypt.key-secret=s0"); err != nil {
		t.Fatal(err)
	}
	if err := formats.Lookup("qcow").Create(ours, o); err != nil {
		t.Fatal(err)
	}
	formatstest.SameFiles(t, ours, name)
	formatstest.Exec(t, "qemu-io", "--object", secret, "--image-opts", "-c", "write -P 1 0 6k", "-c", "write -P 2 100k 512",
		"driver=qcow,encrypt.key-secret=s0,file.filename="+name)
	// qemu-img needs the key, so formatstest.QemuRaw cannot read it.
	rawOf := func() []byte {
		out := filepath.Join(t.TempDir(), "raw")
		formatstest.Exec(t, "qemu-img", "convert", "-U", "--object", secret, "--image-opts",
			"driver=qcow,encrypt.key-secret=s0,file.filename="+name, "-O", "raw", out)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	if _, err := formats.Open(name, formats.OpenOptions{Format: "qcow", ReadOnly: true}); err == nil ||
		err.Error() != "Parameter 'encrypt.key-secret' is required for cipher" {
		t.Fatalf("open without the key: %v", err)
	}
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "qcow", KeySecret: "s0",
		Secrets: map[string][]byte{"s0": []byte("pw")}})
	want := rawOf()
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, img), want); i >= 0 {
		t.Fatalf("read differs from qemu-img at %d", i)
	}
	for i, w := range []struct{ off, n int64 }{{100, 50}, {5000, 5000}, {200 << 10, 1}, {300<<10 + 511, 2}} {
		p := bytes.Repeat([]byte{byte(10 + i)}, int(w.n))
		if _, err := img.WriteAt(p, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], p)
	}
	d, err := img.(formats.Describer).Describe()
	if err != nil || !d.Encrypted {
		t.Fatalf("Describe: %+v, %v; want encrypted", d, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if i := formatstest.FirstDiff(rawOf(), want); i >= 0 {
		t.Fatalf("qemu-img reads our writes differently at %d", i)
	}
}
