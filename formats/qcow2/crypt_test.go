package qcow2

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// Differential tests of LUKS-encrypted qcow2 images made by qemu-img
// and written by qemu-io.

const cryptSecretObj = "secret,id=sec0,data=abc"

var cryptSecrets = map[string][]byte{"sec0": []byte("abc")}

// cryptImageOpts is the --image-opts string that unlocks name.
func cryptImageOpts(name string) string {
	return "driver=qcow2,encrypt.key-secret=sec0,file.filename=" + name
}

// qemuCryptCreate makes an encrypted qcow2 image with qemu-img, retrying
// its flaky PBKDF2 benchmark (see formatstest.Exec).
func qemuCryptCreate(t *testing.T, name, opts, size string) {
	t.Helper()
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", "--object", cryptSecretObj,
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"+opts, name, size)
}

func openCryptImg(t *testing.T, name string, oo formats.OpenOptions) (formats.Image, error) {
	t.Helper()
	oo.Format = "qcow2"
	return formats.Open(name, oo)
}

func TestCryptReadQEMUImage(t *testing.T) {
	haveQemu(t)
	tests := []struct {
		name, opts string
		writes     []string
	}{
		{"default", "", []string{"write -P 0x5a 4k 70k", "write -P 0x11 200001 333"}},
		{"small clusters", ",cluster_size=4096", []string{"write -P 0xa5 1000 10000", "write -z 2048 512", "write -P 0x77 700k 5"}},
		{"cbc essiv", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256", []string{"write -P 0x33 65535 2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "c.qcow2")
			qemuCryptCreate(t, name, tc.opts, "1M")
			args := []string{"--object", cryptSecretObj, "--image-opts"}
			for _, w := range tc.writes {
				args = append(args, "-c", w)
			}
			execOut(t, "qemu-io", append(args, cryptImageOpts(name))...)
			raw := filepath.Join(t.TempDir(), "raw")
			execOut(t, "qemu-img", "convert", "-U", "--object", cryptSecretObj, "--image-opts", cryptImageOpts(name), "-O", "raw", raw)
			want, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			img, err := openCryptImg(t, name, formats.OpenOptions{ReadOnly: true, Secrets: cryptSecrets, KeySecret: "sec0"})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			got := readAll(t, img)
			if i := diffOffset(got, want); i >= 0 {
				t.Fatalf("guest data differs from qemu-img's at %d", i)
			}
			// Unaligned reads decrypt the sectors around them.
			for _, r := range [][2]int64{{4095, 3}, {200001, 333}, {65530, 20}, {1000, 1}} {
				buf := make([]byte, r[1])
				if _, err := img.ReadAt(buf, r[0]); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, want[r[0]:r[0]+r[1]]) {
					t.Errorf("read %d+%d differs", r[0], r[1])
				}
			}
			// Like QEMU, no host offsets for encrypted data (map refuses).
			if e, err := img.BlockStatus(4096, 4096); err != nil || e.Status&formats.StatusData == 0 || e.Status&formats.StatusOffsetValid != 0 {
				t.Errorf("block status of encrypted data: %+v, %v", e, err)
			}
			checkCryptInfo(t, name)
		})
	}
}

// qemuCryptRaw returns the guest data of an encrypted image as qemu-img
// convert decrypts it.
func qemuCryptRaw(t *testing.T, name string) []byte {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "raw")
	execOut(t, "qemu-img", "convert", "-U", "--object", cryptSecretObj, "--image-opts", cryptImageOpts(name), "-O", "raw", raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCryptWrite(t *testing.T) {
	haveQemu(t)
	tests := []struct {
		name, opts string
	}{
		{"default", ""},
		{"small clusters", ",cluster_size=4096"},
		{"extended l2", ",extended_l2=on"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "c.qcow2")
			qemuCryptCreate(t, name, tc.opts, "1M")
			execOut(t, "qemu-io", "--object", cryptSecretObj, "--image-opts", "-c", "write -P 0x5a 4k 70k", cryptImageOpts(name))
			want := qemuCryptRaw(t, name)
			img, err := openCryptImg(t, name, formats.OpenOptions{Secrets: cryptSecrets, KeySecret: "sec0"})
			if err != nil {
				t.Fatal(err)
			}
			// Into allocated clusters (partial sectors), new clusters
			// (copy on write of the unwritten rest) and across both.
			writes := []struct {
				off int64
				n   int
				b   byte
			}{{5000, 7, 1}, {4096, 512, 2}, {70000, 9000, 3}, {300001, 1, 4}, {1048575, 1, 5}, {65530, 100, 6}}
			for _, w := range writes {
				p := bytes.Repeat([]byte{w.b}, w.n)
				if _, err := img.WriteAt(p, w.off); err != nil {
					t.Fatal(err)
				}
				copy(want[w.off:], p)
			}
			if err := img.(*Image).WriteZeroes(0, 65536, true); err != nil {
				t.Fatal(err)
			}
			clear(want[:65536])
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
		})
	}
}

// checkCryptInfo compares control.Info (metadata-only open, no key)
// with qemu-img info, human and JSON.
func checkCryptInfo(t *testing.T, name string) {
	t.Helper()
	list, err := control.Info(control.InfoOptions{Filename: name, Format: "qcow2",
		Open: func(f, format string) (formats.Image, error) {
			return formats.Open(f, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true})
		}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := list.JSON(), execOut(t, "qemu-img", "info", "-U", "-f", "qcow2", "--output=json", name); got != want {
		t.Errorf("info JSON:\n%s\nqemu-img:\n%s", got, want)
	}
	if got, want := list.Human(), execOut(t, "qemu-img", "info", "-U", "-f", "qcow2", name); got != want {
		t.Errorf("info:\n%s\nqemu-img:\n%s", got, want)
	}
}

func TestCryptOpenErrors(t *testing.T) {
	haveQemu(t)
	name := filepath.Join(t.TempDir(), "c.qcow2")
	qemuCryptCreate(t, name, "", "1M")
	tests := []struct {
		oo   formats.OpenOptions
		want string
		is   error
	}{
		{formats.OpenOptions{ReadOnly: true, Secrets: map[string][]byte{"sec0": []byte("abd")}, KeySecret: "sec0"}, "Invalid password, cannot unlock any keyslot", nil},
		{formats.OpenOptions{ReadOnly: true}, "Parameter 'encrypt.key-secret' is required for cipher", formats.ErrInvalidOption},
		{formats.OpenOptions{ReadOnly: true, KeySecret: "sec1", Secrets: cryptSecrets}, "No secret with id 'sec1'", formats.ErrInvalidOption},
	}
	for _, tc := range tests {
		img, err := openCryptImg(t, name, tc.oo)
		if err == nil {
			img.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.is != nil && !errors.Is(err, tc.is)) {
			t.Errorf("open with %+v: %v, want %q", tc.oo, err, tc.want)
		}
	}
}

// cryptCheckClean fails the test unless qemu-img check, which needs the
// key of an encrypted image, finds it clean.
func cryptCheckClean(t *testing.T, name string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-U", "--object", cryptSecretObj, "--image-opts", cryptImageOpts(name)).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("No errors were found on the image.")) {
		t.Fatalf("qemu-img check %s: %v\n%s", name, err, out)
	}
}

// cryptCreate creates an encrypted image with our driver.
func cryptCreate(t *testing.T, name, opts string) error {
	t.Helper()
	o := formats.NewOptions(Driver.CreateSpecs())
	o.Secrets = cryptSecrets
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	return Driver.Create(name, o)
}

func TestCryptCreate(t *testing.T) {
	haveQemu(t)
	tests := []struct {
		name, opts string
	}{
		{"default", ""},
		{"small clusters", ",cluster_size=4096"},
		{"aes-128 cbc essiv", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
			if err := cryptCreate(t, ours, "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,size=1M"+tc.opts); err != nil {
				t.Fatal(err)
			}
			qemuCryptCreate(t, theirs, tc.opts, "1M")
			// The same layout: header fields and the LUKS region.
			a, b := readHeaderFile(t, ours), readHeaderFile(t, theirs)
			if a.CryptMethod != b.CryptMethod || !bytes.Equal(a.CryptoExt, b.CryptoExt) || a.L1TableOffset != b.L1TableOffset {
				t.Errorf("header: crypt %d ext %x l1 %#x, qemu-img: crypt %d ext %x l1 %#x",
					a.CryptMethod, a.CryptoExt, a.L1TableOffset, b.CryptMethod, b.CryptoExt, b.L1TableOffset)
			}
			cryptCheckClean(t, ours)
			execOut(t, "qemu-io", "--object", cryptSecretObj, "--image-opts", "-c", "write -P 0x42 1000 100000", cryptImageOpts(ours))
			want := qemuCryptRaw(t, ours)
			if !bytes.Equal(want[1000:101000], bytes.Repeat([]byte{0x42}, 100000)) {
				t.Fatal("qemu-img does not read back what qemu-io wrote")
			}
			img, err := openCryptImg(t, ours, formats.OpenOptions{ReadOnly: true, Secrets: cryptSecrets, KeySecret: "sec0"})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if i := diffOffset(readAll(t, img), want); i >= 0 {
				t.Errorf("guest data differs from qemu-img's at %d", i)
			}
		})
	}
}

func readHeaderFile(t *testing.T, name string) *Header {
	t.Helper()
	f, err := formats.OpenFile(name, true, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := readHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestCryptCreateErrors(t *testing.T) {
	tests := []struct {
		opts, want string
		is         error
	}{
		{"encrypt.key-secret=sec0", "Parameter 'encrypt.format' is missing", formats.ErrInvalidOption},
		{"encrypt.format=luks", "Parameter 'encrypt.key-secret' is required for cipher", formats.ErrInvalidOption},
		{"encrypt.format=luks,encrypt.key-secret=sec1", "No secret with id 'sec1'", formats.ErrInvalidOption},
	}
	for _, tc := range tests {
		name := filepath.Join(t.TempDir(), "c.qcow2")
		err := cryptCreate(t, name, tc.opts+",size=1M")
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, tc.is) {
			t.Errorf("%s: %v, want %q", tc.opts, err, tc.want)
		}
		if _, err := os.Stat(name); err == nil {
			t.Errorf("%s: the file was left behind", tc.opts)
		}
	}
}
