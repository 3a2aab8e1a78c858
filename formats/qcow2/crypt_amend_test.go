package qcow2

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

var amendCryptSecrets = map[string][]byte{"sec0": []byte("abc"), "sec1": []byte("def")}

var amendCryptObjects = []string{"--object", "secret,id=sec0,data=abc", "--object", "secret,id=sec1,data=def"}

// cryptAmend runs control.Amend on an encrypted qcow2 image opened with
// key secret key.
func cryptAmendWith(name, key, opts string) error {
	img, err := formats.Open(name, formats.OpenOptions{Format: "qcow2", Secrets: amendCryptSecrets, KeySecret: key})
	if err != nil {
		return err
	}
	defer img.Close()
	if err := control.Amend(control.AmendOptions{Image: img, Options: opts, Secrets: amendCryptSecrets}); err != nil {
		return err
	}
	return img.Close()
}

func qemuCryptAmend(t *testing.T, name, key, opts string) string {
	t.Helper()
	args := append(append([]string{"amend"}, amendCryptObjects...), "-o", opts,
		"--image-opts", "driver=qcow2,encrypt.key-secret="+key+",file.filename="+name)
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err == nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimPrefix(string(out), "qemu-img: "), "\n")
}

// TestCryptAmendKeySlots: encrypt.* options refused as qemu-img refuses
// them; then a key slot imgfs adds to a qcow2 image made by qemu-img
// opens it in qemu-img, and after qemu-img erased the original slot
// imgfs still reads the data with the new one; info and check agree
// with qemu-img.
func TestCryptAmendKeySlots(t *testing.T) {
	haveQemu(t)
	plain := filepath.Join(t.TempDir(), "p.qcow2")
	if err := createOpts(t, plain, "size=1M"); err != nil {
		t.Fatal(err)
	}
	plainImg := openImg(t, plain, false)
	err := control.Amend(control.AmendOptions{Image: plainImg, Options: "encrypt.state=inactive,encrypt.keyslot=3"})
	plainImg.Close()
	if err == nil || err.Error() != "Can't amend encryption options - encryption not present" {
		t.Errorf("plain image: %v", err)
	}
	name := filepath.Join(t.TempDir(), "a.qcow2")
	qemuCryptCreate(t, name, "", "1M")
	// Refusals first, as qemu-img words them, on the image with its one
	// slot: they change nothing.
	for _, opts := range []string{
		"encrypt.new-secret=sec1",
		"encrypt.state=inactive,encrypt.keyslot=3",
		"encrypt.state=inactive,encrypt.keyslot=0",
		"encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0",
		"encrypt.format=luks,encrypt.state=inactive,encrypt.keyslot=0",
	} {
		err := cryptAmendWith(name, "sec0", opts)
		if want := qemuCryptAmend(t, name, "sec0", opts); err == nil || err.Error() != want {
			t.Errorf("amend -o %s: %v, qemu-img: %q", opts, err, want)
		}
	}
	execOut(t, "qemu-io", "--object", cryptSecretObj, "--image-opts", cryptImageOpts(name),
		"-c", "write -P 0x5a 1000 70000", "-c", "write -P 0x33 524288 512")
	raw := filepath.Join(t.TempDir(), "want.raw")
	execOut(t, "qemu-img", "convert", "--object", cryptSecretObj, "--image-opts", cryptImageOpts(name), "-O", "raw", raw)

	if err := cryptAmendWith(name, "sec0", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=2,encrypt.iter-time=10,lazy_refcounts=on"); err != nil {
		t.Fatal(err)
	}
	compare := append(append([]string{"compare"}, amendCryptObjects...), "--image-opts",
		"driver=qcow2,encrypt.key-secret=sec1,file.filename="+name, "driver=raw,file.filename="+raw)
	if out := execOut(t, "qemu-img", compare...); out != "Images are identical.\n" {
		t.Fatalf("qemu-img compare with the added slot: %s", out)
	}
	if msg := qemuCryptAmend(t, name, "sec1", "encrypt.state=inactive,encrypt.old-secret=sec0"); msg != "" {
		t.Fatal(msg)
	}
	img, err := formats.Open(name, formats.OpenOptions{Format: "qcow2", ReadOnly: true, Secrets: amendCryptSecrets, KeySecret: "sec1"})
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, img)
	img.Close()
	if !bytes.Equal(got, rawOfFile(t, raw)) {
		t.Fatal("data differs after the key slots changed")
	}
	if err := cryptAmendWith(name, "sec1", "encrypt.state=inactive,encrypt.old-secret=sec1"); err == nil ||
		err.Error() != "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation" {
		t.Fatalf("erasing the last slot: %v", err)
	}
	check := append(append([]string{"check"}, amendCryptObjects...), "--image-opts", "driver=qcow2,encrypt.key-secret=sec1,file.filename="+name)
	if out := execOut(t, "qemu-img", check...); !strings.Contains(out, "No errors were found on the image.") {
		t.Errorf("qemu-img check: %s", out)
	}
	checkCryptInfo(t, name)
}

func rawOfFile(t *testing.T, name string) []byte {
	t.Helper()
	img, err := formats.Open(name, formats.OpenOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return readAll(t, img)
}
