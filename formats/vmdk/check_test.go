package vmdk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestCheck: a grain pointing past the end of its file fails the check
// with QEMU's message; a clean image passes; repairs are unsupported.
func TestCheck(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "c.vmdk")
	img := created(t, name, "subformat=monolithicSparse", 1<<20)
	img.Close()
	img, err := formats.Open(name, formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	c := img.(formats.Checker)
	if res, err := c.Check(context.Background(), formats.CheckReadOnly, func(string) {}); err != nil || *res != (formats.CheckResult{}) {
		t.Errorf("Check of a clean image = %+v, %v", res, err)
	}
	if _, err := c.Check(context.Background(), formats.CheckFixLeaks, func(string) {}); !errors.Is(err, formats.ErrUnsupported) {
		t.Errorf("Check -r leaks: %v, want ErrUnsupported", err)
	}
	img.Close()

	// Point grain 3 of the first table far past the end of the file.
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	gd := binary.LittleEndian.Uint64(b[4+52:])
	gt := binary.LittleEndian.Uint32(b[gd*512:])
	binary.LittleEndian.PutUint32(b[int(gt)*512+3*4:], 100000)
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err = formats.Open(name, formats.OpenOptions{Format: "vmdk", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var msgs []string
	res, err := img.(formats.Checker).Check(context.Background(), formats.CheckReadOnly, func(m string) { msgs = append(msgs, m) })
	if !errors.Is(err, syscall.EINVAL) || res == nil || res.Corruptions != 1 {
		t.Errorf("Check = %+v, %v; want one corruption and EINVAL", res, err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command("qemu-img", "check", "c.vmdk")
	cmd.Dir, cmd.Stderr = dir, &stderr
	cmd.Run()
	if want := msgs[0] + "\nqemu-img: Check failed: " + err.Error() + "\n"; len(msgs) != 1 || stderr.String() != want {
		t.Errorf("messages %q, error %v; qemu-img says %q", msgs, err, stderr.String())
	}
}

// TestMultiExtentPassesQemu writes across the extents of a hand-written
// descriptor and has qemu-img compare the result.
func TestMultiExtentPassesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	const size = 4<<20 + 3*512
	img := multiExtent(t, size)
	want := make([]byte, size)
	for i, off := range []int64{0, 2048*512 - 700, (2048+3000)*512 - 100, size - 70000} {
		data := pattern(70000, uint64(i))
		if _, err := img.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], data)
	}
	name := img.Filename()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(name)
	if err := os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	formatstest.Exec(t, "qemu-img", "check", filepath.Join(dir, "multi.vmdk"))
	formatstest.Exec(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", filepath.Join(dir, "multi.vmdk"), filepath.Join(dir, "want.raw"))
	formatstest.SameInfoAndMap(t, "vmdk", filepath.Join(dir, "multi.vmdk"))
}
