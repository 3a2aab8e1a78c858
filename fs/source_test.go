package fs

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/imgfs/imgfs/formats"
	_ "github.com/imgfs/imgfs/formats/all"
	"github.com/imgfs/imgfs/formats/formatstest"
)

func TestIsImageFile(t *testing.T) {
	raw, qcow2 := &formats.Driver{Name: "raw"}, &formats.Driver{Name: "qcow2"}
	tests := []struct {
		d    *formats.Driver
		name string
		size int64
		want bool
	}{
		{qcow2, "anything", 7, true},
		{raw, "disk.img", 1 << 20, true},
		{raw, "DISK.RAW", 512, true},
		{raw, "cd.iso", 2048, true},
		{raw, "fw.bin", 4096, true},
		{raw, "disk.img", 1000, false}, // not whole sectors
		{raw, "disk.img", 0, false},
		{raw, "notes.txt", 512, false},
		{raw, "archive.tar", 10240, false},
	}
	for _, tt := range tests {
		if got := isImageFile(tt.d, tt.name, tt.size); got != tt.want {
			t.Errorf("isImageFile(%s, %q, %d) = %v, want %v", tt.d.Name, tt.name, tt.size, got, tt.want)
		}
	}
}

func TestSource(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	dir, outside := t.TempDir(), t.TempDir()
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", filepath.Join(dir, "top.qcow2"))
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "plain.img"), "1M")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(outside, "far.qcow2"), "1M")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", filepath.Join(outside, "far.qcow2"), "-F", "qcow2", filepath.Join(dir, "escape.qcow2"))
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub.img"), 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := newSource(dir, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	names, err := s.list()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"base.qcow2", "escape.qcow2", "plain.img", "top.qcow2"}; !slices.Equal(names, want) {
		t.Errorf("list = %q, want %q", names, want)
	}
	base, _ := s.lookup("base.qcow2")
	if !s.backsAnother(s.path("base.qcow2"), base) {
		t.Error("base.qcow2 backs top.qcow2 but is not seen to")
	}
	top, _ := s.lookup("top.qcow2")
	if s.backsAnother(s.path("top.qcow2"), top) {
		t.Error("top.qcow2 backs nothing")
	}
	if err := s.chain(s.path("escape.qcow2")).err; !errors.Is(err, errOutside) {
		t.Errorf("chain of escape.qcow2: %v, want errOutside", err)
	}
	if _, ok := s.lookup("../" + filepath.Base(outside)); ok {
		t.Error("lookup left SOURCE")
	}

	allowed, err := newSource(dir, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := allowed.chain(allowed.path("escape.qcow2")).err; err != nil {
		t.Errorf("allow_outside: %v", err)
	}

	// A single image is shown whatever its name, and alone.
	single, err := newSource(filepath.Join(dir, "notes.txt"), false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if names, _ := single.list(); !slices.Equal(names, []string{"notes.txt"}) {
		t.Errorf("single-file SOURCE lists %q", names)
	}

	// A split VMDK's extent is part of it, not an image of its own; a
	// backing file changed on the host makes the chain entry new.
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", filepath.Join(dir, "split.vmdk"), "1M")
	names, _ = s.list()
	if want := []string{"base.qcow2", "escape.qcow2", "plain.img", "split.vmdk", "top.qcow2"}; !slices.Equal(names, want) {
		t.Errorf("with a split vmdk list = %q, want %q", names, want)
	}
	if _, ok := s.show("split-s001.vmdk"); ok {
		t.Error("the extent split-s001.vmdk is shown")
	}
	if _, ok := s.show("split.vmdk"); !ok {
		t.Error("split.vmdk is not shown")
	}
	old := s.chain(s.path("top.qcow2"))
	formatstest.Exec(t, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", filepath.Join(dir, "base.qcow2"))
	if now := s.chain(s.path("top.qcow2")); now.sameVersion(old) {
		t.Error("top.qcow2's chain is the same version after its backing file was written")
	}
	os.Remove(filepath.Join(dir, "split.vmdk"))
	os.Remove(filepath.Join(dir, "split-s001.vmdk"))

	// A removed image vanishes; an added one appears.
	os.Remove(filepath.Join(dir, "plain.img"))
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "new.qcow2"), "1M")
	names, _ = s.list()
	if want := []string{"base.qcow2", "escape.qcow2", "new.qcow2", "top.qcow2"}; !slices.Equal(names, want) {
		t.Errorf("after changes list = %q, want %q", names, want)
	}
}
