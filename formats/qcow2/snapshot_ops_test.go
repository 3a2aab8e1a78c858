package qcow2

import (
	"bytes"
	"errors"
	"math"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

func TestStrtoul(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"1", 1},
		{"42", 42},
		{"  7", 7},
		{"+3", 3},
		{"12abc", 12},
		{"abc", 0},
		{"", 0},
		{"-1", math.MaxUint64},
		{"99999999999999999999999", math.MaxUint64},
	} {
		if got := strtoul(tc.in); got != tc.want {
			t.Errorf("strtoul(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

func TestFindSnapshot(t *testing.T) {
	img := &Image{snapshots: []SnapshotEntry{
		{ID: "1", Name: "a"}, {ID: "2", Name: "b"}, {ID: "3", Name: "1"}, {ID: "10", Name: "b"},
	}}
	for _, tc := range []struct {
		id, name string
		want     int
	}{
		{"1", "", 0},
		{"", "b", 1},
		{"10", "b", 3},
		{"2", "a", -1},
		{"", "", -1},
		{"4", "", -1},
	} {
		if got := img.findSnapshot(tc.id, tc.name); got != tc.want {
			t.Errorf("findSnapshot(%q, %q) = %d, want %d", tc.id, tc.name, got, tc.want)
		}
	}
	// By ID first: "1" is snapshot 1's ID and snapshot 3's name.
	for in, want := range map[string]int{"1": 0, "a": 0, "b": 1, "3": 2, "x": -1} {
		if got := img.findSnapshotByIDOrName(in); got != want {
			t.Errorf("findSnapshotByIDOrName(%q) = %d, want %d", in, got, want)
		}
	}
	if got := img.nextSnapshotID(); got != "11" {
		t.Errorf("nextSnapshotID = %q, want 11", got)
	}
}

// TestSnapshotTableRoundTrip encodes entries and reads them back as the
// table parser does.
func TestSnapshotTableRoundTrip(t *testing.T) {
	h := &Header{ClusterBits: 16, SnapshotsOffset: 0}
	img := &Image{hdr: h, size: 1 << 20}
	list := []SnapshotEntry{
		{L1TableOffset: 0x30000, L1Size: 1, ID: "1", Name: "first", DateSec: 5, DateNsec: 6000, VMClockNsec: 7,
			DiskSize: 1 << 20, HasDiskSize: true, ICount: ^uint64(0)},
		{L1TableOffset: 0x40000, L1Size: 2, ID: "2", Name: "a longer name", VMStateSize: 1 << 33, ICount: 9,
			Extra: append(make([]byte, snapshotExtraLen), 1, 2, 3, 4, 5, 6, 7, 8)},
	}
	buf, err := img.encodeSnapshotTable(list)
	if err != nil {
		t.Fatal(err)
	}
	h.NbSnapshots = uint32(len(list))
	got, err := ReadSnapshotTable(bytes.NewReader(buf), h)
	if err != nil {
		t.Fatal(err)
	}
	for i, sn := range got {
		w := list[i]
		if sn.ID != w.ID || sn.Name != w.Name || sn.L1TableOffset != w.L1TableOffset || sn.L1Size != w.L1Size ||
			sn.DateSec != w.DateSec || sn.DateNsec != w.DateNsec || sn.VMClockNsec != w.VMClockNsec ||
			sn.VMStateSize != w.VMStateSize || sn.ICount != w.ICount || sn.DiskSize != w.diskSize(img.size) {
			t.Errorf("entry %d: got %+v, want %+v", i, sn, w)
		}
	}
	if !bytes.Equal(got[1].Extra[snapshotExtraLen:], list[1].Extra[snapshotExtraLen:]) {
		t.Errorf("unknown extra data not kept: %x", got[1].Extra)
	}
	if got[1].Offset%8 != 0 {
		t.Errorf("entry 1 at %d, not 8-byte aligned", got[1].Offset)
	}
	if _, err := img.encodeSnapshotTable([]SnapshotEntry{{Name: strings.Repeat("x", 1<<16)}}); err == nil {
		t.Error("name of 64 KiB encoded")
	}
}

// TestSnapshotLifecycle drives the driver alone and checks content, the
// snapshot view and qemu-img's verdict after each operation.
func TestSnapshotLifecycle(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{"", "-o compat=0.10", "-o extended_l2=on", "-o lazy_refcounts=on"} {
		t.Run(opts, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "s.qcow2")
			args := append(append([]string{"create", "-q", "-f", "qcow2"}, strings.Fields(opts)...), name, "1M")
			execOut(t, "qemu-img", args...)
			qemuIO(t, name, "write -P 1 0 128k")

			img := openImg(t, name, false)
			if err := img.CreateSnapshot(formats.Snapshot{Name: "one", DateSec: 1}); err != nil {
				t.Fatal(err)
			}
			first := readAll(t, img)
			if _, err := img.WriteAt(bytes.Repeat([]byte{2}, 4096), 4096); err != nil {
				t.Fatal(err)
			}
			view, err := img.OpenSnapshot("", "one")
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, view); !bytes.Equal(got, first) {
				t.Fatalf("snapshot view differs at %d", diffOffset(got, first))
			}
			if ext, err := view.BlockStatus(0, 1<<20); err != nil || ext.Status&formats.StatusData == 0 || ext.Length != 128<<10 {
				t.Fatalf("view block status: %+v, %v", ext, err)
			}
			if _, err := view.WriteAt([]byte{1}, 0); !errors.Is(err, formats.ErrReadOnly) {
				t.Fatalf("write to view: %v", err)
			}
			view.Close()
			if err := img.ApplySnapshot("nope"); !errors.Is(err, formats.ErrSnapshotNotFound) {
				t.Fatalf("apply of a missing snapshot: %v", err)
			}
			if err := img.ApplySnapshot("1"); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, img); !bytes.Equal(got, first) {
				t.Fatalf("after apply: differs at %d", diffOffset(got, first))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, name)
			if out := execOut(t, "qemu-img", "snapshot", "-l", name); !strings.Contains(out, "1         one") {
				t.Fatalf("qemu-img snapshot -l:\n%s", out)
			}

			img = openImg(t, name, false)
			if err := img.DeleteSnapshot("1", "other"); !errors.Is(err, formats.ErrSnapshotNotFound) {
				t.Fatalf("delete with a wrong name: %v", err)
			}
			if err := img.DeleteSnapshot("1", "one"); err != nil {
				t.Fatal(err)
			}
			if list, _ := img.Snapshots(); len(list) != 0 {
				t.Fatalf("after delete: %+v", list)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, name)
			if got := rawOf(t, name); !bytes.Equal(got, first) {
				t.Fatalf("after delete: differs at %d", diffOffset(got, first))
			}
		})
	}
}
