package vmdk_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// TestBacking: a child made by our Create against a qemu-img parent
// reads through to it, copies the parent's data around partial writes,
// and stops reading it once the parent's CID changes, as QEMU does.
func TestBacking(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "base.vmdk", "2M")
	run(t, dir, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 1M", "base.vmdk")

	d := formats.Lookup("vmdk")
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse("size=2M,backing_file=base.vmdk,backing_fmt=vmdk"); err != nil {
		t.Fatal(err)
	}
	child := filepath.Join(dir, "child.vmdk")
	if err := d.Create(child, o); err != nil {
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
	if got, want := readAll(t, child), qemuRaw(t, dir, "child.vmdk"); !bytes.Equal(got, want) {
		t.Errorf("child reads differently from qemu-img convert")
	}
	run(t, dir, "qemu-img", "check", "child.vmdk")
	compareInfo(t, dir, "child.vmdk")
	compareMap(t, dir, "child.vmdk")

	// Writing the parent gives it a new CID: the child's parentCID no
	// longer matches and reads of unallocated grains fail.
	run(t, dir, "qemu-io", "-f", "vmdk", "-c", "write -P 1 1M 512", "base.vmdk")
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
