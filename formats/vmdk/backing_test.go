package vmdk_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestBacking: a child made by our Create against a qemu-img parent
// reads through to it, copies the parent's data around partial writes,
// and stops reading it once the parent's CID changes, as QEMU does.
func TestBacking(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vmdk", filepath.Join(dir, "base.vmdk"), "2M")
	formatstest.QemuIO(t, "vmdk", filepath.Join(dir, "base.vmdk"), "write -P 0x5a 0 1M")

	child := filepath.Join(dir, "child.vmdk")
	if err := formatstest.Create(t, "vmdk", child, "size=2M,backing_file=base.vmdk,backing_fmt=vmdk"); err != nil {
		t.Fatal(err)
	}
	img, err := formats.Open(child, formats.OpenOptions{Format: "vmdk"})
	if err != nil {
		t.Fatal(err)
	}
	if name, format := img.(formats.Backed).BackingInfo(); name != "base.vmdk" || format != "vmdk" {
		t.Errorf("BackingInfo = %q, %q", name, format)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xa5}, 1000), 70000); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	ro := formatstest.Open(t, child, formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	formatstest.SameAsQemuRaw(t, ro)
	ro.Close() // base.vmdk is written below
	formatstest.Exec(t, "qemu-img", "check", filepath.Join(dir, "child.vmdk"))
	formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "child.vmdk"))

	// Writing the parent gives it a new CID: the child's parentCID no
	// longer matches and reads of unallocated grains fail.
	formatstest.QemuIO(t, "vmdk", filepath.Join(dir, "base.vmdk"), "write -P 1 1M 512")
	img, err = formats.Open(child, formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 512)
	if _, err := img.ReadAt(buf, 70000); err != nil {
		t.Errorf("reading an allocated grain: %v", err)
	}
	if _, err := img.ReadAt(buf, 0); !errors.Is(err, errInvalid) {
		t.Errorf("reading through a changed parent: %v, want EINVAL", err)
	}
}
