package vhdx

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// dirtyQemuImage returns an image whose log holds an entry QEMU wrote
// and has yet to be replayed: QEMU writes a block (its BAT update goes
// through the log, which it then empties), and the test puts the BAT
// entry back and the entry's log GUID into the current header, which is
// the state of a crash after the log write.
func dirtyQemuImage(t *testing.T) string {
	name := filepath.Join(t.TempDir(), "dirty.vhdx")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", name, "8M")
	before, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	formatstest.QemuIO(t, "vhdx", name, "write -P 0x11 1M 64k")
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	entry := decodeLogEntryHeader(b[headerSectionEnd:])
	if !entry.signatureOK {
		t.Fatal("QEMU left no log entry")
	}
	bat := decodeRegionEntry(b[regionTable1+16:])
	copy(b[bat.FileOffset:bat.FileOffset+logSectorSize], before[bat.FileOffset:])
	cur := header1Offset
	if decodeHeader(b[header2Offset:]).Sequence > decodeHeader(b[header1Offset:]).Sequence {
		cur = header2Offset
	}
	h := decodeHeader(b[cur:])
	h.LogGUID = entry.LogGUID
	h.encode(b[cur : cur+headerCRCSize])
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestDirtyLogReadOnly(t *testing.T) {
	formatstest.RequireQemu(t)
	name := dirtyQemuImage(t)
	want := stderrOf(t, "qemu-img", "info", "-f", "vhdx", name)
	_, err := formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
	if !errors.Is(err, formats.ErrReadOnly) {
		t.Fatalf("read-only open of a dirty image: %v", err)
	}
	if got := "Could not open '" + name + "': " + err.Error(); strings.TrimSuffix(want, "\n") != got {
		t.Errorf("error\n%s\nqemu-img:\n%s", got, want)
	}
}

func TestDirtyLogReplay(t *testing.T) {
	formatstest.RequireQemu(t)
	name := dirtyQemuImage(t)
	dir := t.TempDir()
	qcopy, ocopy := filepath.Join(dir, "q.vhdx"), filepath.Join(dir, "o.vhdx")
	copyFile(t, name, qcopy)
	copyFile(t, name, ocopy)
	wantJSON := formatstest.Exec(t, "qemu-img", "check", "-r", "all", "--output=json", "-f", "vhdx", qcopy)
	want := formatstest.QemuRaw(t, "vhdx", qcopy)
	if want[1<<20] != 0x11 {
		t.Fatal("QEMU's replay did not bring the block back")
	}

	img, err := formats.Open(ocopy, formats.OpenOptions{Format: "vhdx", Check: true})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := control.Check(context.Background(), control.CheckOptions{Image: img, Filename: qcopy, Mode: formats.CheckFixAll})
	if err != nil {
		t.Fatal(err)
	}
	if got := rep.JSON(); got != wantJSON {
		t.Errorf("check JSON\n%s\nqemu-img:\n%s", got, wantJSON)
	}
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, img), want); i >= 0 {
		t.Fatalf("replayed content differs from QEMU's at %d", i)
	}
	img.Close()
	mustBeClean(t, ocopy)
	if i := formatstest.FirstDiff(formatstest.QemuRaw(t, "vhdx", ocopy), want); i >= 0 {
		t.Fatalf("QEMU reads our replayed image differently at %d", i)
	}
}

// TestOurLogReplaysInQemu crashes one of our allocations after its log
// entry is durable: QEMU must replay our entry to the intended BAT.
func TestOurLogReplaysInQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	name := filepath.Join(t.TempDir(), "o.vhdx")
	if err := formatstest.Create(t, "vhdx", name, "block_size=1M,size=8M"); err != nil {
		t.Fatal(err)
	}
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx"}).(*Image)
	data := []byte(strings.Repeat("imgfs log ", 500))
	if _, err := img.WriteAt(data, 100); err != nil { // a block allocated the normal way
		t.Fatal(err)
	}
	// Allocate block 2 by hand and stop after the log write.
	pos := int64(2<<20 + 4096)
	end, err := img.f.Size()
	if err != nil {
		t.Fatal(err)
	}
	if err := img.f.Truncate(end + img.blockSize); err != nil {
		t.Fatal(err)
	}
	if _, err := img.f.WriteAt(data, end+pos%img.blockSize); err != nil {
		t.Fatal(err)
	}
	sector := make([]byte, logSectorSize)
	for i := range logSectorSize / 8 {
		binary.LittleEndian.PutUint64(sector[8*i:], img.bat[i])
	}
	binary.LittleEndian.PutUint64(sector[8*img.batIndex(2):], uint64(end)|blockFullyPresent)
	img.mu.Lock()
	err = img.writeLogEntry([]logWrite{{offset: uint64(img.batOffset), data: sector}})
	img.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	img.f.Close() // the crash

	if _, err := formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: true}); !errors.Is(err, formats.ErrReadOnly) {
		t.Fatalf("read-only open after the crash: %v", err)
	}
	qcopy := filepath.Join(t.TempDir(), "q.vhdx")
	copyFile(t, name, qcopy)
	formatstest.Exec(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", qcopy)
	want := formatstest.QemuRaw(t, "vhdx", qcopy)
	if string(want[100:100+len(data)]) != string(data) || string(want[pos:pos+int64(len(data))]) != string(data) {
		t.Fatal("QEMU's replay of our log lost data")
	}
	got := formatstest.Open(t, name, formats.OpenOptions{Format: "vhdx"})
	defer got.Close()
	if i := formatstest.FirstDiff(formatstest.ReadAll(t, got), want); i >= 0 {
		t.Fatalf("our replay differs from QEMU's at %d", i)
	}
}
