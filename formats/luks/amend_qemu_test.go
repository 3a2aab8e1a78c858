package luks

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// amendSecrets are the passphrases the amend tests use: sec0 opens the
// image newImage makes.
var amendSecrets = map[string][]byte{"sec0": []byte("abc"), "sec1": []byte("def"), "sec2": []byte("ghi")}

var amendObjects = []string{"--object", "secret,id=sec0,data=abc", "--object", "secret,id=sec1,data=def", "--object", "secret,id=sec2,data=ghi"}

// ourAmend runs control.Amend on name opened with key secret key.
func ourAmend(name, key, opts string, force bool) error {
	img, err := formats.Open(name, formats.OpenOptions{Format: "luks", Secrets: amendSecrets, KeySecret: key})
	if err != nil {
		return err
	}
	defer img.Close()
	return control.Amend(control.AmendOptions{Image: img, Options: opts, Force: force, Secrets: amendSecrets})
}

// qemuAmend runs qemu-img amend and returns its message, "" on success.
func qemuAmend(name, key, opts string, force bool) string {
	args := append([]string{"amend"}, amendObjects...)
	if force {
		args = append(args, "--force")
	}
	args = append(args, "-o", opts, "--image-opts", "driver=luks,key-secret="+key+",file.filename="+name)
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err == nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimPrefix(string(out), "qemu-img: "), "\n")
}

// TestAmendKeySlots adds and erases key slots with imgfs and with
// qemu-img in turn: each must open the slots the other made, the data
// must survive, and info and the erased slots' bytes must be QEMU's.
func TestAmendKeySlots(t *testing.T) {
	needQEMU(t)
	name := newImage(t, "", 64<<10)
	img := openLUKS(t, name, false)
	want := bytes.Repeat([]byte("amend"), (64<<10)/5+1)[:64<<10]
	if _, err := img.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuReads := func(key string) {
		t.Helper()
		args := append([]string{"compare"}, amendObjects...)
		args = append(args, "--image-opts", "driver=luks,key-secret="+key+",file.filename="+name, "driver=raw,file.filename="+raw)
		if out := run(t, "qemu-img", args...); out != "Images are identical.\n" {
			t.Fatalf("qemu-img compare with %s: %s", key, out)
		}
	}
	weRead := func(key string) {
		t.Helper()
		img, err := formats.Open(name, formats.OpenOptions{Format: "luks", ReadOnly: true, Secrets: amendSecrets, KeySecret: key})
		if err != nil {
			t.Fatalf("open with %s: %v", key, err)
		}
		defer img.Close()
		if !bytes.Equal(readAll(t, img), want) {
			t.Fatalf("data read with %s differs", key)
		}
	}

	if err := ourAmend(name, "sec0", "state=active,new-secret=sec1,keyslot=3,iter-time=10", false); err != nil {
		t.Fatal(err)
	}
	qemuReads("sec1")
	if msg := qemuAmend(name, "sec1", "state=active,new-secret=sec2,iter-time=10", false); msg != "" {
		t.Fatal(msg)
	}
	weRead("sec2")
	if msg := qemuAmend(name, "sec2", "state=inactive,keyslot=0", false); msg != "" {
		t.Fatal(msg)
	}
	if err := ourAmend(name, "sec2", "state=inactive,old-secret=sec1", false); err != nil {
		t.Fatal(err)
	}
	weRead("sec2")
	qemuReads("sec2")
	checkInfo(t, name)

	// Slot 0 was erased by QEMU, slot 3 by imgfs: both hold the
	// disabled state, no iterations and a zero salt, and keep their
	// key offset and stripes.
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 3} {
		e := b[208+48*i : 208+48*(i+1)]
		if binary.BigEndian.Uint32(e) != slotDisabled || !bytes.Equal(e[4:40], make([]byte, 36)) ||
			binary.BigEndian.Uint32(e[40:]) != uint32(8+i*504) || binary.BigEndian.Uint32(e[44:]) != Stripes {
			t.Errorf("erased slot %d: % x", i, e)
		}
	}
}

// TestAmendErrorsMatchQEMU runs refused amendments through both tools
// on copies of one image with slots 0 (sec0) and 1 (sec1).
func TestAmendErrorsMatchQEMU(t *testing.T) {
	needQEMU(t)
	base := newImage(t, "", 64<<10)
	if err := ourAmend(base, "sec0", "state=active,new-secret=sec1,iter-time=10", false); err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		opts  string
		force bool
	}{
		{"state=active,new-secret=sec2,keyslot=1", false},
		{"state=active,new-secret=sec2,keyslot=8", false},
		{"state=active,new-secret=sec2,keyslot=-1", false},
		{"state=active,iter-time=10", false},
		{"state=active,new-secret=sec2,old-secret=sec0", false},
		{"state=active,new-secret=sec9,iter-time=10", false},
		{"new-secret=sec2", false},
		{"state=foo", false},
		{"state=inactive", false},
		{"state=inactive,keyslot=5", false},
		{"state=inactive,keyslot=-1", false},
		{"state=inactive,old-secret=sec2", false},
		{"state=inactive,old-secret=sec9", false},
		{"state=inactive,keyslot=1,old-secret=sec0", false},
		{"state=inactive,keyslot=1,new-secret=sec0", false},
		{"state=inactive,keyslot=1,iter-time=5", false},
		{"state=inactive,old-secret=sec0,keyslot=0", false},
		{"size=1G", false},
	}
	for _, tc := range tests {
		ours := filepath.Join(t.TempDir(), "a.luks")
		theirs := filepath.Join(t.TempDir(), "b.luks")
		for _, f := range []string{ours, theirs} {
			if err := os.WriteFile(f, orig, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		// Erasing slot 0 with sec0 works: it is the refusals after it
		// that are compared, against the same state.
		if strings.HasSuffix(tc.opts, "keyslot=0") {
			if err := ourAmend(ours, "sec0", "state=inactive,keyslot=1", false); err != nil {
				t.Fatal(err)
			}
			if msg := qemuAmend(theirs, "sec0", "state=inactive,keyslot=1", false); msg != "" {
				t.Fatal(msg)
			}
		}
		err := ourAmend(ours, "sec0", tc.opts, tc.force)
		want := qemuAmend(theirs, "sec0", tc.opts, tc.force)
		if err == nil || err.Error() != want {
			t.Errorf("amend -o %s: %v, qemu-img: %q", tc.opts, err, want)
		}
	}
}
