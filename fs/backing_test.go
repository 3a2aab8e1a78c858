package fs

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats/formatstest"
)

func TestBackingTarget(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	dir, outside := t.TempDir(), t.TempDir()
	mk := func(args ...string) {
		formatstest.Exec(t, "qemu-img", append([]string{"create", "-q", "-f", "qcow2"}, args...)...)
	}
	mk(filepath.Join(dir, "base.qcow2"), "1M")
	mk("-b", "base.qcow2", "-F", "qcow2", filepath.Join(dir, "top.qcow2"))
	mk("-b", filepath.Join(dir, "base.qcow2"), "-F", "qcow2", filepath.Join(dir, "abs.qcow2"))
	mk(filepath.Join(outside, "far.qcow2"), "1M")
	mk("-b", filepath.Join(outside, "far.qcow2"), "-F", "qcow2", filepath.Join(dir, "escape.qcow2"))
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	mk(filepath.Join(dir, "sub", "deep.qcow2"), "1M")
	mk("-b", "sub/deep.qcow2", "-F", "qcow2", filepath.Join(dir, "nested.qcow2"))
	mk("-u", "-b", "gone.qcow2", "-F", "qcow2", filepath.Join(dir, "dangling.qcow2"), "1M")

	for _, allow := range []bool{false, true} {
		s, err := newSource(dir, allow, nil)
		if err != nil {
			t.Fatal(err)
		}
		tr := &tree{src: s, logf: t.Logf, open: map[*imageDir]bool{}}
		for _, tt := range []struct {
			name, want string
		}{
			{"top.qcow2", "../base.qcow2"},
			{"abs.qcow2", "../base.qcow2"},
			{"base.qcow2", ""},     // no backing file
			{"escape.qcow2", ""},   // outside SOURCE, even when allowed
			{"nested.qcow2", ""},   // not an image directory of the mount
			{"dangling.qcow2", ""}, // missing
		} {
			d := &imageDir{t: tr, name: tt.name, path: s.path(tt.name)}
			got, ok := d.backingTarget()
			if got != tt.want || ok != (tt.want != "") {
				t.Errorf("allow_outside=%v: backing of %s = %q, %v; want %q", allow, tt.name, got, ok, tt.want)
			}
		}
	}
}
