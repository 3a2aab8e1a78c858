package luks

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw"
)

// Differential tests against QEMU 7.2's qemu-img and qemu-io.

const secretObj = "secret,id=sec0,data=abc"

var secrets = map[string][]byte{"sec0": []byte("abc")}

func needQEMU(t *testing.T) {
	t.Helper()
	formatstest.RequireQemu(t)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// qemuCreate makes a 1 MiB LUKS image with qemu-img and the -o options
// opts after key-secret=sec0,iter-time=10.
func qemuCreate(t *testing.T, name, opts string) {
	t.Helper()
	if opts != "" {
		opts = "," + opts
	}
	qemuRetry(t, "create", "-q", "-f", "luks", "--object", secretObj, "-o", "key-secret=sec0,iter-time=10"+opts, name, "1M")
}

// qemuRetry runs qemu-img with args and returns its output, retrying
// the passing failures formatstest.Exec knows.
func qemuRetry(t *testing.T, args ...string) string {
	t.Helper()
	return formatstest.Exec(t, "qemu-img", args...)
}

// imageOpts is how qemu opens a LUKS image with its key.
func imageOpts(name string) string {
	return "driver=luks,key-secret=sec0,file.filename=" + name
}

func openLUKS(t *testing.T, name string, readOnly bool) formats.Image {
	t.Helper()
	img, err := formats.Open(name, formats.OpenOptions{Format: "luks", ReadOnly: readOnly,
		Secrets: secrets, KeySecret: "sec0"})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return img
}

func readAll(t *testing.T, img formats.Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// createOpts are the -o variants our driver creates, after
// key-secret=sec0,iter-time=10.
var createOpts = []string{
	"",
	"cipher-mode=cbc,ivgen-alg=essiv,cipher-alg=aes-128",
	"cipher-alg=aes-128",
	"cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1",
	"ivgen-alg=essiv,cipher-alg=aes-192",
}

// qemuCreateOpts are the variants qemu-img creates: fewer, as each
// costs QEMU over a second of PBKDF2 benchmark. Between them they cover
// every cipher family and mode, all IV generators and some hashes; TestCipherMatrixAgainstQEMU covers the rest through
// images qemu-io writes.
var qemuCreateOpts = []string{
	"",
	"ivgen-alg=essiv,cipher-alg=aes-192",
	"cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha512",
	"cipher-alg=twofish-128,cipher-mode=ctr,ivgen-alg=plain,hash-alg=ripemd160",
	"cipher-alg=cast5-128,cipher-mode=ecb,hash-alg=md5",
}

func TestReadsQEMUImages(t *testing.T) {
	needQEMU(t)
	if testing.Short() {
		t.Skip("qemu-img spends seconds benchmarking PBKDF2 for each image")
	}
	for i, o := range qemuCreateOpts {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			name := filepath.Join(dir, "q.luks")
			qemuCreate(t, name, o)
			run(t, "qemu-io", "--object", secretObj, "--image-opts", imageOpts(name),
				"-c", "write -P 0x5a 1000 70000", "-c", "write -P 0x33 524288 512", "-c", "write -P 0x11 1048000 576")
			raw := filepath.Join(dir, "q.raw")
			run(t, "qemu-img", "convert", "--object", secretObj, "--image-opts", imageOpts(name), "-O", "raw", raw)
			want, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			img := openLUKS(t, name, true)
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("content differs from qemu-img convert")
			}
			checkInfo(t, name)
			if o == "" {
				checkOpenErrors(t, name)
			}
		})
	}
}

// checkInfo compares control.Info with qemu-img info, human and JSON.
func checkInfo(t *testing.T, name string) {
	t.Helper()
	list, err := control.Info(control.InfoOptions{Filename: name, Format: "luks",
		Open: func(f, format string) (formats.Image, error) {
			return formats.Open(f, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true})
		}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := list.JSON(), run(t, "qemu-img", "info", "-f", "luks", "--output=json", name); got != want {
		t.Errorf("info JSON:\n%s\nqemu-img:\n%s", got, want)
	}
	if got, want := list.Human(), run(t, "qemu-img", "info", "-f", "luks", name); got != want {
		t.Errorf("info:\n%s\nqemu-img:\n%s", got, want)
	}
}

// checkOpenErrors opens the image made by qemu-img without its key or
// with a wrong one.
func checkOpenErrors(t *testing.T, name string) {
	tests := []struct {
		oo   formats.OpenOptions
		want string
	}{
		{formats.OpenOptions{Secrets: map[string][]byte{"sec0": []byte("abd")}, KeySecret: "sec0"}, "Invalid password, cannot unlock any keyslot"},
		{formats.OpenOptions{}, "Parameter 'key-secret' is required for cipher"},
		{formats.OpenOptions{KeySecret: "sec1", Secrets: secrets}, "No secret with id 'sec1'"},
	}
	for _, tc := range tests {
		tc.oo.Format, tc.oo.ReadOnly = "luks", true
		img, err := formats.Open(name, tc.oo)
		if err == nil {
			img.Close()
		}
		if err == nil || err.Error() != tc.want {
			t.Errorf("open with %+v: %v, want %q", tc.oo, err, tc.want)
		}
	}
}

// newImage creates a LUKS image with our driver.
func newImage(t *testing.T, opts string, size int64) string {
	t.Helper()
	d := formats.Lookup("luks")
	o := formats.NewOptions(d.CreateSpecs())
	o.Secrets = secrets
	if err := o.Parse("key-secret=sec0,iter-time=10" + opts); err != nil {
		t.Fatal(err)
	}
	if err := o.Set("size", strconv.FormatInt(size, 10)); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(t.TempDir(), "o.luks")
	if err := d.Create(name, o); err != nil {
		t.Fatalf("create: %v", err)
	}
	return name
}

func TestQEMUReadsOurImages(t *testing.T) {
	needQEMU(t)
	for i, o := range createOpts {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			if o != "" {
				o = "," + o
			}
			name := newImage(t, o, 1<<20+512)
			img := openLUKS(t, name, false)
			// A fresh LUKS image reads as the decryption of zeroes, so
			// write every byte.
			want := bytes.Repeat([]byte{0xa5}, int(img.Size()))
			if _, err := img.WriteAt(want, 0); err != nil {
				t.Fatal(err)
			}
			for _, w := range []struct{ off, n int64 }{{1000, 70000}, {524288, 512}, {1048000, 1000}, {1<<20 + 100, 300}} {
				for k := w.off; k < w.off+w.n; k++ {
					want[k] = byte(k*7 + w.off)
				}
				if _, err := img.WriteAt(want[w.off:w.off+w.n], w.off); err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(filepath.Dir(name), "want.raw")
			if err := os.WriteFile(raw, want, 0o644); err != nil {
				t.Fatal(err)
			}
			if out := run(t, "qemu-img", "compare", "--object", secretObj, "--image-opts", imageOpts(name), "driver=raw,file.filename="+raw); out != "Images are identical.\n" {
				t.Fatalf("qemu-img compare: %s", out)
			}
			checkInfo(t, name)
		})
	}
}

func TestConformance(t *testing.T) {
	formatstest.RunOpen(t, func(t *testing.T, size int64) formats.Image {
		img := openLUKS(t, newImage(t, "", size), false)
		// The suite wants an image that reads as zeroes; a fresh LUKS
		// image reads as the decryption of zeroes, as in QEMU.
		if _, err := img.WriteAt(make([]byte, size), 0); err != nil {
			t.Fatal(err)
		}
		return img
	}, formats.OpenOptions{Secrets: secrets, KeySecret: "sec0"})
}

// TestConvertToLUKS converts a raw image with a zero run before its data
// into a new LUKS image: the zero run must be written (a new LUKS image
// reads as noise) without disturbing the data.
func TestConvertToLUKS(t *testing.T) {
	needQEMU(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := make([]byte, 1<<20)
	for i := 4096; i < 14096; i++ {
		want[i] = 7
	}
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := formats.Open(src, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	target := filepath.Join(dir, "t.luks")
	err = control.Convert(context.Background(), control.ConvertOptions{
		Sources: []formats.Image{in}, Target: target, TargetFormat: "luks",
		Options: "key-secret=sec0,iter-time=10", Secrets: secrets, Workers: 8, SparseSize: 4096,
		OpenTarget: func(control.CacheMode) (formats.Image, error) {
			return formats.Open(target, formats.OpenOptions{Format: "luks", Secrets: secrets, KeySecret: "sec0"})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if out := run(t, "qemu-img", "compare", "--object", secretObj, "--image-opts", imageOpts(target), "driver=raw,file.filename="+src); out != "Images are identical.\n" {
		t.Fatalf("qemu-img compare: %s", out)
	}
}

func TestMeasure(t *testing.T) {
	needQEMU(t)
	if testing.Short() {
		t.Skip("qemu-img spends seconds benchmarking PBKDF2 for each measure")
	}
	// A source's size is rounded up to a sector, --size is not.
	src := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(src, make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := formats.Open(src, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	// One case: each costs qemu-img a PBKDF2 benchmark.
	opts := "key-secret=sec0,cipher-alg=serpent-128,cipher-mode=ctr"
	res, err := control.Measure(control.MeasureOptions{Format: "luks", Options: opts, Secrets: secrets, Size: -1, Source: in})
	if err != nil {
		t.Fatal(err)
	}
	want := qemuRetry(t, "measure", "--object", secretObj, "--output=json", "-O", "luks", "-o", opts, "-f", "raw", src)
	if got := res.JSON(); got != want {
		t.Errorf("measure %s:\n%s\nqemu-img:\n%s", opts, got, want)
	}
	if res, err = control.Measure(control.MeasureOptions{Format: "luks", Options: opts, Secrets: secrets, Size: 1000}); err != nil {
		t.Fatal(err)
	}
	if res.Required != 528384+1000 || res.FullyAllocated != res.Required {
		t.Errorf("measure --size 1000: %+v, want the 528384-byte header and 1000", res)
	}
}

// TestPrealloc: preallocation allocates the whole file.
func TestPrealloc(t *testing.T) {
	name := newImage(t, ",preallocation=falloc", 1<<20)
	img := openLUKS(t, name, true)
	defer img.Close()
	st, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	if alloc, err := img.(formats.AllocatedSizer).AllocatedSize(); err != nil || alloc < st.Size() {
		t.Errorf("preallocated image has %d of %d bytes allocated (%v)", alloc, st.Size(), err)
	}
}
