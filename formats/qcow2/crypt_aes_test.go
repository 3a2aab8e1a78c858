package qcow2

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
	"github.com/imgfs/imgfs/formats/qcow"
)

// Differential tests of legacy AES-encrypted qcow2 images
// (crypt_method 1), which qemu-img 7.2 creates, reads and writes
// without a warning. The secret is the LUKS tests' (cryptSecretObj).

// qemuAESCreate makes a legacy AES image with qemu-img.
func qemuAESCreate(t *testing.T, name, opts, size string) {
	t.Helper()
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "--object", cryptSecretObj,
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0"+opts, name, size)
}

// aesWrites are qemu-io commands whose guest offsets differ from the
// host offsets they get (the first write allocates the highest cluster
// first), so that an IV taken from the wrong offset cannot go unnoticed.
var aesWrites = []string{"write -P 0x11 300001 1000", "write -P 0x22 1000 9000", "write -z 20480 4096", "write -P 0x33 65535 2"}

// qemuAESWrite runs aesWrites through qemu-io on an AES image.
func qemuAESWrite(t *testing.T, name string, cmds ...string) {
	t.Helper()
	args := []string{"--object", cryptSecretObj, "--image-opts"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	execOut(t, "qemu-io", append(args, cryptImageOpts(name))...)
}

func openAES(t *testing.T, name string, readOnly bool) formats.Image {
	t.Helper()
	img, err := openCryptImg(t, name, formats.OpenOptions{ReadOnly: readOnly, Secrets: cryptSecrets, KeySecret: "sec0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// TestAESReadQEMUImage reads AES images qemu-io wrote and compares info
// (which needs no key) with qemu-img's.
func TestAESReadQEMUImage(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{"", ",cluster_size=4096", ",cluster_size=4096,compat=0.10", ",extended_l2=on,cluster_size=16384"} {
		t.Run(subtestName(opts), func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "aes.qcow2")
			qemuAESCreate(t, name, opts, "1M")
			qemuAESWrite(t, name, aesWrites...)
			want := qemuCryptRaw(t, name)
			if i := diffOffset(readAll(t, openAES(t, name, true)), want); i >= 0 {
				t.Errorf("guest data differs from qemu-img's at %d", i)
			}
			checkCryptInfo(t, name)
		})
	}
}

// TestAESCreate creates AES images with our driver and with qemu-img:
// the files must be identical.
func TestAESCreate(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{
		"encrypt.format=aes,encrypt.key-secret=sec0",
		"encryption=on,encrypt.key-secret=sec0",
		"encrypt.format=qcow,encrypt.key-secret=sec0,cluster_size=4096",
		"encrypt.format=aes,encryption=off,encrypt.key-secret=sec0,compat=0.10",
		"encrypt.format=aes,encrypt.key-secret=sec0,preallocation=metadata",
		"encrypt.format=aes,encrypt.key-secret=sec0,extended_l2=on,lazy_refcounts=on",
	} {
		t.Run(subtestName(opts), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
			if err := cryptCreate(t, ours, opts+",size=1M"); err != nil {
				t.Fatal(err)
			}
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "--object", cryptSecretObj, "-o", opts, theirs, "1M")
			formatstest.SameFiles(t, ours, theirs)
		})
	}
}

// TestAESWrite writes unaligned data, into new and allocated clusters,
// into an image qemu-img made and qemu-io wrote and into one we made:
// qemu-img must read our writes back, check must find the image clean,
// and the same writes through qemu-io must give the same file.
func TestAESWrite(t *testing.T) {
	haveQemu(t)
	writes := []struct {
		off int64
		n   int
		b   byte
	}{{700000, 3, 1}, {5000, 7, 2}, {4096, 512, 3}, {70000, 9000, 4}, {300001, 1, 5}, {1048575, 1, 6}, {65530, 100, 7}}
	for _, ourCreate := range []bool{false, true} {
		t.Run(map[bool]string{false: "qemu image", true: "our image"}[ourCreate], func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			name, twin := filepath.Join(dir, "aes.qcow2"), filepath.Join(dir, "twin.qcow2")
			qemuAESCreate(t, twin, ",cluster_size=4096", "1M")
			if ourCreate {
				if err := cryptCreate(t, name, "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=4096,size=1M"); err != nil {
					t.Fatal(err)
				}
			} else {
				qemuAESCreate(t, name, ",cluster_size=4096", "1M")
				qemuAESWrite(t, name, aesWrites...)
				qemuAESWrite(t, twin, aesWrites...)
			}
			want := qemuCryptRaw(t, name)
			img := openAES(t, name, false)
			var cmds []string
			for _, w := range writes {
				p := bytes.Repeat([]byte{w.b}, w.n)
				if _, err := img.WriteAt(p, w.off); err != nil {
					t.Fatal(err)
				}
				copy(want[w.off:], p)
				cmds = append(cmds, "write -P "+itoa(int64(w.b))+" "+itoa(w.off)+" "+itoa(int64(w.n)))
			}
			if got := readAll(t, img); diffOffset(got, want) >= 0 {
				t.Errorf("our read back differs at %d", diffOffset(got, want))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if i := diffOffset(qemuCryptRaw(t, name), want); i >= 0 {
				t.Fatalf("qemu-img reads our writes differently at %d", i)
			}
			cryptCheckClean(t, name)
			qemuAESWrite(t, twin, cmds...)
			formatstest.SameFiles(t, name, twin)
		})
	}
}

// TestAESIVIsGuestSector pins the IV scheme: qcow2's legacy AES counts
// guest sectors, unlike LUKS, which counts host sectors. It decrypts a
// sector qemu-io wrote with both numbers; only the guest one may give
// the data back.
func TestAESIVIsGuestSector(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "aes.qcow2")
	qemuAESCreate(t, name, ",cluster_size=4096", "1M")
	const guest = 300 << 10
	qemuAESWrite(t, name, "write -P 0x5a 300k 512")
	img := openAES(t, name, true).(*Image)
	img.mu.Lock()
	m, err := img.lookup(guest, 512)
	img.mu.Unlock()
	if err != nil || m.typ != Normal {
		t.Fatalf("lookup: %+v, %v", m, err)
	}
	if m.host == guest {
		t.Fatal("the cluster's host and guest offsets coincide: the test cannot tell the IVs apart")
	}
	c, err := qcow.NewLegacyCipher("sec0", cryptSecrets)
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
	}{{guest / 512, true}, {m.host / 512, false}} {
		buf := append([]byte(nil), raw[m.host:m.host+512]...)
		c.Decrypt(buf, iv.sector)
		if bytes.Equal(buf, want) != iv.ok {
			t.Errorf("decrypting with sector %d as IV: data back %v, want %v", iv.sector, !iv.ok, iv.ok)
		}
	}
	if s := img.crypt.ivSector(m.host, guest); s != guest/512 {
		t.Errorf("ivSector(host %#x, guest %#x) = %d, want the guest sector %d", m.host, guest, s, guest/512)
	}
}

// TestAESCreateErrors compares our create errors with qemu-img's
// messages for the same options, and whether a file is left behind.
func TestAESCreateErrors(t *testing.T) {
	haveQemu(t)
	const nulSecret = "secret,id=nul,file="
	for _, opts := range []string{
		"encrypt.format=aes",
		"encryption=on",
		"encrypt.format=aes,encrypt.key-secret=sec1",
		"encrypt.format=aes,encrypt.key-secret=nul",
		"encrypt.format=aes,encryption=on,encrypt.key-secret=sec0",
		"compat=bogus,encryption=on,encrypt.format=aes",
		"encrypt.format=bogus,preallocation=bogus",
		"compat=0.10,lazy_refcounts=on,encrypt.format=aes,encrypt.cipher-alg=x",
		"compat=0.10,lazy_refcounts=on,encrypt.format=aes,encrypt.key-secret=sec1",
		"encryption=off,encrypt.key-secret=sec0",
		"encrypt.format=aes,encrypt.hash-alg=y,encrypt.cipher-alg=x,encrypt.iter-time=5",
		"encrypt.format=aes,encrypt.ivgen-hash-alg=y,encrypt.ivgen-alg=x",
		"encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=a,encrypt.cipher-mode=b,encrypt.ivgen-alg=c,encrypt.ivgen-hash-alg=d,encrypt.hash-alg=e,encrypt.iter-time=5",
		"encrypt.format=aes,encrypt.cipher-alg=a,encrypt.cipher-mode=b,encrypt.ivgen-alg=c,encrypt.ivgen-hash-alg=d,encrypt.hash-alg=e,encrypt.iter-time=5",
	} {
		t.Run(subtestName(opts), func(t *testing.T) {
			dir := t.TempDir()
			nul := filepath.Join(dir, "nul")
			if err := os.WriteFile(nul, []byte("ab\x00c"), 0o600); err != nil {
				t.Fatal(err)
			}
			name := filepath.Join(dir, "c.qcow2")
			out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "--object", cryptSecretObj,
				"--object", nulSecret+nul, "-o", opts, name, "1M").CombinedOutput()
			if err == nil {
				t.Fatalf("qemu-img create succeeded:\n%s", out)
			}
			want := strings.TrimSuffix(strings.TrimPrefix(string(out), "qemu-img: "+name+": "), "\n")
			_, statErr := os.Stat(name)
			qemuLeft := statErr == nil
			os.Remove(name)

			o := formats.NewOptions(Driver.CreateSpecs())
			o.Secrets = map[string][]byte{"sec0": cryptSecrets["sec0"], "nul": []byte("ab\x00c")}
			if err := o.Parse(opts + ",size=1M"); err != nil {
				t.Fatal(err)
			}
			err = Driver.Create(name, o)
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
