package vhdx

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestCorruptImages breaks one field of a valid image at a time: the
// open fails with QEMU's message (compared with qemu-img info), for the
// reason the test aims at.
func TestCorruptImages(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	const metaOff = 3 * miB // where a log_size=1M image of 1M keeps its metadata
	le := binary.LittleEndian
	fixRegion := func(b []byte) { setChecksum(b[regionTable1:regionTable1+headerBlockSize], 4) }
	for _, tc := range []struct {
		name   string
		mutate func(b []byte)
		reason string // substring of openError.reason; "" for a formats.Error
		kind   error
	}{
		{"both headers", func(b []byte) { b[header1Offset+200]++; b[header2Offset+200]++ }, "", formats.ErrCorrupt},
		{"region checksum", func(b []byte) { b[regionTable1+1000]++ }, "checksum", formats.ErrCorrupt},
		{"region signature", func(b []byte) { b[regionTable1] = 'x'; fixRegion(b) }, "signature", formats.ErrCorrupt},
		{"region count", func(b []byte) { le.PutUint32(b[regionTable1+8:], 2048); fixRegion(b) }, "2048 region", formats.ErrCorrupt},
		{"region overlap", func(b []byte) { le.PutUint64(b[regionTable1+16+16:], miB); fixRegion(b) }, "overlaps", formats.ErrCorrupt},
		{"required region", func(b []byte) {
			le.PutUint32(b[regionTable1+8:], 3)
			e := regionEntry{GUID: newGUID(), FileOffset: 7 * miB, Length: miB, Required: true}
			e.encode(b[regionTable1+16+2*regionEntryLen:])
			fixRegion(b)
		}, "unknown required region", formats.ErrUnsupported},
		{"metadata signature", func(b []byte) { b[metaOff] = 'x' }, "metadata signature", formats.ErrCorrupt},
		{"block size", func(b []byte) { le.PutUint32(b[metaOff+headerBlockSize:], 3*miB) }, "block size", formats.ErrCorrupt},
		{"logical sector", func(b []byte) { le.PutUint32(b[metaOff+headerBlockSize+32:], 1024) }, "logical sector", formats.ErrUnsupported},
		{"has parent", func(b []byte) { le.PutUint32(b[metaOff+headerBlockSize+4:], paramHasParent) }, "without a parent locator", formats.ErrCorrupt},
		{"missing item", func(b []byte) { le.PutUint16(b[metaOff+10:], 4) }, "missing", formats.ErrUnsupported},
		{"BAT region", func(b []byte) { le.PutUint32(b[regionTable1+16+24:], 0); fixRegion(b) }, "too small", formats.ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "c.vhdx")
			if err := formatstest.Create(t, "vhdx", name, "size=1M,block_size=1M"); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			tc.mutate(b)
			if err := os.WriteFile(name, b, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err = formats.Open(name, formats.OpenOptions{Format: "vhdx", ReadOnly: true})
			if !errors.Is(err, tc.kind) {
				t.Fatalf("open: %v, want %v", err, tc.kind)
			}
			var oe *openError
			if tc.reason != "" && (!errors.As(err, &oe) || !strings.Contains(oe.reason, tc.reason)) {
				t.Errorf("open failed for another reason: %+v", err)
			}
			want := stderrOf(t, "qemu-img", "info", "-U", "-f", "vhdx", name)
			want = want[strings.LastIndex(want, "\nqemu-img: ")+1:]
			want = strings.TrimPrefix(want, "qemu-img: ")
			if got := "Could not open '" + name + "': " + err.Error(); got != want {
				t.Errorf("error\n%s\nqemu-img:\n%s", got, want)
			}
		})
	}
}
