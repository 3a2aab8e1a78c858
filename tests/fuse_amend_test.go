package tests

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFUSEAmendKeySlots adds LUKS key slots through ctl, with secrets
// defined in the ctl line (--object, from data and from a file) and the
// mount's own passphrase (imgfs-mount-key), and erases the slot of the
// mount's passphrase, after which the mount cannot open the image. After the unmount qemu-img opens the images with
// the new secrets, reads the data they held, and no longer opens the
// erased slot.
func TestFUSEAmendKeySlots(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	steps := [][]string{
		{"create", "-q", "-f", "luks", "--object", secretObject, "-o", lukskey, "t.luks", "1M"},
		{"create", "-q", "-f", "qcow2", "--object", secretObject,
			"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", "e.qcow2", "1M"},
	}
	for _, args := range steps {
		if r := runQemuImg(t, src, args...); r.code != 0 {
			t.Fatalf("qemu-img %q: exit %d\n%s", args, r.code, r.stderr)
		}
	}
	luks := image{"luks", "t.luks"}
	qemuIOImage(t, src, luks, []string{"write -P 0x5c 0 1M"})
	mustRun(t, src, qemuIOPath, "--object", secretObject, "--image-opts", "-c", "write -P 0x6d 0 1M",
		"driver=qcow2,encrypt.key-secret=sec0,file.filename=e.qcow2")
	// The data as qemu-img reads it with the old passphrase, to compare
	// with what it reads with the new ones.
	want := map[string]string{}
	for _, f := range []string{"t.luks", "e.qcow2"} {
		want[f] = filepath.Join(t.TempDir(), "want.raw")
		mustRun(t, src, qemuImg, "convert", "--object", secretObject, "--image-opts", openOpts(f, "sec0"), "-O", "raw", want[f])
	}
	// The second passphrase comes from a file inside the mounted
	// directory, with a blank that a ctl line could not carry.
	if err := os.WriteFile(filepath.Join(src, "new.key"), []byte("second key"), 0o600); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(fuseKey), 0o600); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(t.TempDir(), "outside.key")
	if err := os.WriteFile(outside, []byte("outside"), 0o600); err != nil {
		t.Fatal(err)
	}
	mnt := mountImgfs(t, src, "key_file="+keyFile)
	dirL, dirQ := filepath.Join(mnt, "t.luks"), filepath.Join(mnt, "e.qcow2")

	// Refusals first: each leaves the image alone.
	refusals := []struct {
		dir, line, msg string
		errno          unix.Errno
	}{
		{dirL, "amend -o state=active,new-secret=nosuch,iter-time=10", "No secret with id 'nosuch'", unix.EINVAL},
		{dirL, "amend --object secret,id=k,file=" + outside + " -o state=active,new-secret=k,iter-time=10",
			"outside the mounted directory", unix.EACCES},
		{dirL, "amend --object secret,id=k,file=nosuch.key -o state=active,new-secret=k,iter-time=10",
			"no such file", unix.ENOENT},
		{dirL, "amend --object secret,id=k -o state=active,new-secret=k", "Either 'file' or 'data' must be provided", unix.EINVAL},
	}
	for _, r := range refusals {
		err := writeCtl(t, r.dir, r.line)
		if !errors.Is(err, r.errno) {
			t.Errorf("ctl %q: %v, want %v", r.line, err, r.errno)
		}
		if st := readStatus(t, r.dir); !strings.Contains(st.Error, r.msg) {
			t.Errorf("ctl %q: status error %q, want it to contain %q", r.line, st.Error, r.msg)
		}
	}

	mustCtl(t, dirL, "amend --object secret,id=k2,file=new.key -o state=active,new-secret=k2,iter-time=10")
	// The mount's passphrase is a secret the line can name: its slot
	// is erased, so that the mount, which closed the image after the
	// command, cannot unlock it again.
	mustCtl(t, dirL, "amend -o state=inactive,old-secret=imgfs-mount-key")
	if _, err := os.ReadFile(filepath.Join(dirL, "disk")); !errors.Is(err, unix.EACCES) {
		t.Errorf("reading t.luks/disk after its passphrase's slot was erased: %v, want EACCES", err)
	}
	mustCtl(t, dirQ, "amend --object secret,id=k3,data=third,,key -o encrypt.state=active,encrypt.new-secret=k3,encrypt.iter-time=10")
	if _, err := os.ReadFile(filepath.Join(dirQ, "disk")); err != nil {
		t.Errorf("reading e.qcow2/disk after the amend: %v", err)
	}
	umountImgfs(t, mnt)

	newKey := "secret,id=sec0,file=" + filepath.Join(src, "new.key")
	third := "secret,id=sec0,data=third,,key"
	for _, c := range []struct {
		file, object string
		opens        bool
	}{
		{"t.luks", newKey, true},
		{"t.luks", secretObject, false},
		{"e.qcow2", third, true},
		{"e.qcow2", secretObject, true},
	} {
		args := []string{"compare", "--object", c.object, "--image-opts", openOpts(c.file, "sec0"), "driver=raw,file.filename=" + want[c.file]}
		r := run(t, src, qemuImg, args...)
		switch {
		case c.opens && (r.code != 0 || r.stdout != "Images are identical.\n"):
			t.Errorf("%s with %s: exit %d\n%s%s", c.file, c.object, r.code, r.stdout, r.stderr)
		case !c.opens && !strings.Contains(r.stderr, "Invalid password, cannot unlock any keyslot"):
			t.Errorf("%s with the erased passphrase: exit %d\n%s%s", c.file, r.code, r.stdout, r.stderr)
		}
	}
	if r := run(t, src, qemuImg, "check", "--object", third, "--image-opts", openOpts("e.qcow2", "sec0")); r.code != 0 {
		t.Errorf("qemu-img check e.qcow2: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// openOpts opens an encrypted image of the test with key secret id.
func openOpts(file, id string) string {
	if strings.HasSuffix(file, ".qcow2") {
		return "driver=qcow2,encrypt.key-secret=" + id + ",file.filename=" + file
	}
	return "driver=luks,key-secret=" + id + ",file.filename=" + file
}
