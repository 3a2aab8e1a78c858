package qcow

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// Differential tests of legacy AES-encrypted qcow images beyond
// TestEncrypted: writes identical to qemu-io's, the IV scheme, and the
// creation errors.

const (
	aesSecretObj = "secret,id=s0,data=pw"
	aesImageOpts = "driver=qcow,encrypt.key-secret=s0,file.filename="
)

var aesSecrets = map[string][]byte{"s0": []byte("pw")}

// aesCreate creates an AES image with our driver.
func aesCreate(t *testing.T, name, opts string) error {
	t.Helper()
	o := formats.NewOptions(formats.Lookup("qcow").CreateSpecs())
	o.Secrets = aesSecrets
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return formats.Lookup("qcow").Create(name, o)
}

func qemuAESIO(t *testing.T, name string, cmds ...string) {
	t.Helper()
	args := []string{"--object", aesSecretObj, "--image-opts"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	formatstest.Exec(t, "qemu-io", append(args, aesImageOpts+name)...)
}

// TestAESWriteLikeQemu writes the same data with qemu-io into a
// qemu-img AES image and with our driver into ours (both with and
// without a backing file): the files must be identical and qemu-img
// must find our image equal to the raw data.
func TestAESWriteLikeQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range []string{"encrypt.format=aes,encrypt.key-secret=s0", "encryption=on,encrypt.key-secret=s0,backing_file=base.raw,backing_fmt=raw"} {
		t.Run(subtestName(opts), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", base, "3M")
			ours, theirs := filepath.Join(dir, "ours.qcow"), filepath.Join(dir, "theirs.qcow")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", "--object", aesSecretObj, "-o", opts, theirs, "3M")
			if err := aesCreate(t, ours, opts+",size=3M"); err != nil {
				t.Fatal(err)
			}
			formatstest.SameFiles(t, ours, theirs)
			// Whole sectors: QEMU's partial-sector read-modify-write
			// through a backing file is not what the test is about.
			writes := []struct{ off, n int64 }{{2 << 20, 4096}, {4608, 3072}, {0, 512}, {1 << 20, 512}, {12800, 16384}}
			img := formatstest.Open(t, ours, formats.OpenOptions{Format: "qcow", KeySecret: "s0", Secrets: aesSecrets})
			var cmds []string
			for i, w := range writes {
				cmds = append(cmds, "write -P "+itoa(int64(i+1))+" "+itoa(w.off)+" "+itoa(w.n))
				if _, err := img.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, int(w.n)), w.off); err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuAESIO(t, theirs, cmds...)
			formatstest.SameFiles(t, ours, theirs)
			formatstest.Exec(t, "qemu-img", "compare", "-U", "--object", aesSecretObj, "--image-opts",
				aesImageOpts+ours, aesImageOpts+theirs)
		})
	}
}

// TestAESIVIsGuestSector pins the IV scheme: the guest sector number. It
// decrypts a sector qemu-io wrote with its guest and with its host
// sector number; only the guest one may give the data back.
func TestAESIVIsGuestSector(t *testing.T) {
	formatstest.RequireQemu(t)
	name := filepath.Join(t.TempDir(), "aes.qcow")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", "--object", aesSecretObj,
		"-o", "encrypt.format=aes,encrypt.key-secret=s0", name, "1M")
	const guest = 300 << 10
	qemuAESIO(t, name, "write -P 0x5a 300k 512")
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "qcow", ReadOnly: true, NoIO: true}).(*Image)
	img.mu.Lock()
	host, err := img.lookup(guest)
	img.mu.Unlock()
	if err != nil || host == 0 || host&oflagCompressed != 0 {
		t.Fatalf("lookup: %#x, %v", host, err)
	}
	if host == guest {
		t.Fatal("the cluster's host and guest offsets coincide: the test cannot tell the IVs apart")
	}
	c, err := NewLegacyCipher("s0", aesSecrets)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x5a}, 512)
	for _, iv := range []struct {
		sector uint64
		ok     bool
	}{{guest / 512, true}, {host / 512, false}} {
		buf := append([]byte(nil), raw[host:host+512]...)
		c.Decrypt(buf, iv.sector)
		if bytes.Equal(buf, want) != iv.ok {
			t.Errorf("decrypting with sector %d as IV: data back %v, want %v", iv.sector, !iv.ok, iv.ok)
		}
	}
	// And our reader uses the guest sector.
	img = formatstest.Open(t, name, formats.OpenOptions{Format: "qcow", ReadOnly: true, KeySecret: "s0", Secrets: aesSecrets}).(*Image)
	got := make([]byte, 512)
	if _, err := img.ReadAt(got, guest); err != nil || !bytes.Equal(got, want) {
		t.Errorf("read at %#x: %v, data back %v", guest, err, bytes.Equal(got, want))
	}
}

// TestAESCreateErrors compares our create errors with qemu-img's
// messages for the same options, and whether a file is left behind.
func TestAESCreateErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range []string{
		"encrypt.format=aes",
		"encryption=on,encrypt.key-secret=s1",
		"encrypt.format=aes,encrypt.key-secret=bad",
		"encrypt.format=aes,encryption=on,encrypt.key-secret=s0",
		"encryption=on,encrypt.format=luks",
		"encrypt.format=bogus",
		"encrypt.format=luks,encrypt.key-secret=s0",
		"encryption=off,encrypt.key-secret=s0",
	} {
		t.Run(subtestName(opts), func(t *testing.T) {
			dir := t.TempDir()
			bad := filepath.Join(dir, "bad")
			if err := os.WriteFile(bad, []byte("p\xffw"), 0o600); err != nil {
				t.Fatal(err)
			}
			name := filepath.Join(dir, "c.qcow")
			out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow", "--object", aesSecretObj,
				"--object", "secret,id=bad,file="+bad, "-o", opts, name, "1M").CombinedOutput()
			if err == nil {
				t.Fatalf("qemu-img create succeeded:\n%s", out)
			}
			want := strings.TrimSuffix(strings.TrimPrefix(string(out), "qemu-img: "+name+": "), "\n")
			_, statErr := os.Stat(name)
			qemuLeft := statErr == nil
			os.Remove(name)

			o := formats.NewOptions(formats.Lookup("qcow").CreateSpecs())
			o.Secrets = map[string][]byte{"s0": aesSecrets["s0"], "bad": []byte("p\xffw")}
			if err := o.Parse(opts + ",size=1M"); err != nil {
				t.Fatal(err)
			}
			err = formats.Lookup("qcow").Create(name, o)
			if err == nil || err.Error() != want || !errors.Is(err, formats.ErrInvalidOption) {
				t.Errorf("got %v, want %q (ErrInvalidOption)", err, want)
			}
			if _, statErr := os.Stat(name); (statErr == nil) != qemuLeft {
				t.Errorf("file left behind: %v, qemu-img: %v", statErr == nil, qemuLeft)
			}
		})
	}
}

// subtestName is a subtest name for an option list without the commas
// and equals signs that would break the option strings holding the
// test's temporary file names.
func subtestName(opts string) string {
	return strings.NewReplacer(",", " ", "=", "-").Replace(opts)
}

// TestAESOpenFormat compares the encrypt.format open option's checks
// with qemu-img info's messages.
func TestAESOpenFormat(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	enc, plain := filepath.Join(dir, "enc.qcow"), filepath.Join(dir, "plain.qcow")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", "--object", aesSecretObj,
		"-o", "encrypt.format=aes,encrypt.key-secret=s0", enc, "1M")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow", plain, "1M")
	for _, c := range []struct{ file, format string }{
		{enc, "aes"}, {enc, "luks"}, {enc, "qcow"}, {plain, "aes"}, {plain, "luks"},
	} {
		opts := "driver=qcow,encrypt.format=" + c.format + ",file.filename=" + c.file
		out, qerr := exec.Command("qemu-img", "info", "-U", "--image-opts", opts).CombinedOutput()
		want := ""
		if qerr != nil {
			want = strings.TrimSuffix(strings.TrimPrefix(string(out), "qemu-img: Could not open '"+opts+"': "), "\n")
		}
		img, err := formats.Open(c.file, formats.OpenOptions{Format: "qcow", ReadOnly: true, NoIO: true,
			Runtime: map[string]string{"encrypt.format": c.format}})
		got := ""
		if err == nil {
			img.Close()
		} else {
			got = err.Error()
		}
		if got != want {
			t.Errorf("%s with encrypt.format=%s: %q, qemu-img: %q", filepath.Base(c.file), c.format, got, want)
		}
	}
}
