package formats_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// Test drivers, registered once for this test binary.
//
// "imgfs-a" and "imgfs-b" both claim files starting with "AB"; b is more
// sure. "imgfs-len" claims buffers of exactly ProbeSize bytes starting
// with "LEN", to show short files are padded. "imgfs-chain" files hold
// "CHAIN\n" and a backing file name line; opening one opens its backing
// chain. "imgfs-ro" is a read-only driver.
func init() {
	score := func(prefix string, s int) func([]byte, string) int {
		return func(buf []byte, _ string) int {
			if bytes.HasPrefix(buf, []byte(prefix)) {
				return s
			}
			return 0
		}
	}
	formats.Register(&formats.Driver{Name: "imgfs-a", Probe: score("AB", 50)})
	formats.Register(&formats.Driver{Name: "imgfs-b", Probe: score("AB", 60)})
	formats.Register(&formats.Driver{Name: "imgfs-len", Probe: func(buf []byte, _ string) int {
		if len(buf) == formats.ProbeSize && bytes.HasPrefix(buf, []byte("LEN")) {
			return 100
		}
		return 0
	}})
	formats.Register(&formats.Driver{Name: "imgfs-chain", Probe: score("CHAIN\n", 100), Open: openChain})
	formats.Register(&formats.Driver{Name: "imgfs-ro", ReadOnly: true, Probe: score("RO", 100), Open: openChain})
}

// chainImage is an imgfs-chain image: nothing but its backing chain.
type chainImage struct {
	formats.Image // nil; only the methods below are used
	f             *formats.File
	backing       formats.Image
}

func openChain(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	buf := make([]byte, 512)
	f.ReadAt(buf, 0)
	lines := strings.Split(string(bytes.TrimRight(buf, "\x00")), "\n")
	img := &chainImage{f: f}
	if len(lines) > 1 && lines[1] != "" && !o.NoBacking {
		b, err := formats.OpenBacking(f.Name(), lines[1], "", o)
		if err != nil {
			f.Close()
			return nil, err
		}
		img.backing = b
	}
	return img, nil
}

func (c *chainImage) Filename() string              { return c.f.Name() }
func (c *chainImage) Backing() formats.Image        { return c.backing }
func (c *chainImage) BackingInfo() (string, string) { return "", "" }
func (c *chainImage) Close() error {
	if c.backing != nil {
		c.backing.Close()
	}
	return c.f.Close()
}

func write(t *testing.T, name, content string) string {
	t.Helper()
	if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestProbe(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ content, want string }{
		{"ABcd", "imgfs-b"},  // the higher score wins
		{"xyz", "raw"},       // raw only when nobody else claims it
		{"", "raw"},          // empty files are raw without probing
		{"LEN", "imgfs-len"}, // short files are probed padded to ProbeSize
		{"LEN" + strings.Repeat("x", 600), "imgfs-len"}, // only ProbeSize bytes are probed
	} {
		f, err := formats.OpenFile(write(t, filepath.Join(dir, "p"), tc.content), true, false)
		if err != nil {
			t.Fatal(err)
		}
		d, err := formats.ProbeFile(f)
		f.Close()
		if err != nil || d.Name != tc.want {
			t.Errorf("ProbeFile(%q) = %v, %v; want %s", tc.content, d, err, tc.want)
		}
	}
	if formats.ProbeSize != 512 {
		t.Errorf("ProbeSize = %d, QEMU's BLOCK_PROBE_BUF_SIZE is 512", formats.ProbeSize)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	ro := write(t, filepath.Join(dir, "ro"), "RO\n")
	for _, tc := range []struct {
		name string
		o    formats.OpenOptions
		want string
	}{
		{missing, formats.OpenOptions{}, "Could not open '" + missing + "': No such file or directory"},
		{ro, formats.OpenOptions{Format: "nonesuch"}, "Unknown driver 'nonesuch'"},
		{ro, formats.OpenOptions{}, "Driver 'imgfs-ro' can only be used for read-only devices"},
	} {
		img, err := formats.Open(tc.name, tc.o)
		if err == nil {
			img.Close()
		}
		if err == nil || err.Error() != tc.want {
			t.Errorf("Open(%s, %+v) error %v, want %q", tc.name, tc.o, err, tc.want)
		}
	}
	img, err := formats.Open(ro, formats.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Errorf("read-only open of a read-only driver: %v", err)
	} else {
		img.Close()
	}
}

func TestOpenChain(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	write(t, filepath.Join(dir, "base.raw"), "data")
	write(t, filepath.Join(dir, "sub", "mid"), "CHAIN\n../base.raw\n")
	top := write(t, filepath.Join(dir, "top"), "CHAIN\nsub/mid\n")
	img, err := formats.Open(top, formats.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// A second read-write open of top would fail on its write lock.
	defer func() {
		if img != nil {
			img.Close()
		}
	}()
	mid := img.(formats.Backed).Backing()
	if mid == nil || mid.Filename() != filepath.Join(dir, "sub/mid") {
		t.Fatalf("backing of top: %v", mid)
	}
	base := mid.(formats.Backed).Backing()
	if base == nil || base.Filename() != dir+"/sub/../base.raw" || base.Format() != "raw" {
		t.Fatalf("backing of mid: %v", base)
	}
	img.Close()
	img = nil
	// Backing files open read-only, so a probed raw one does not warn.
	var warnings []string
	img2, err := formats.Open(top, formats.OpenOptions{Format: "imgfs-chain", Warn: func(m string) { warnings = append(warnings, m) }})
	if err != nil {
		t.Fatal(err)
	}
	img2.Close()
	if len(warnings) != 0 {
		t.Errorf("warnings for a backing chain: %q", warnings)
	}

	// NoBacking leaves the chain closed.
	img3, err := formats.Open(top, formats.OpenOptions{NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if img3.(formats.Backed).Backing() != nil {
		t.Errorf("NoBacking opened the backing file")
	}
	img3.Close()

	// Loops, also through another name of the same file, are corrupt.
	a := filepath.Join(dir, "a")
	write(t, a, "CHAIN\nb\n")
	write(t, filepath.Join(dir, "b"), "CHAIN\nalias\n")
	os.Symlink("a", filepath.Join(dir, "alias"))
	if img, err := formats.Open(a, formats.OpenOptions{}); !errors.Is(err, formats.ErrCorrupt) {
		if err == nil {
			img.Close()
		}
		t.Errorf("backing loop: %v, want ErrCorrupt", err)
	}
	// A missing backing file names itself.
	c := write(t, filepath.Join(dir, "c"), "CHAIN\nnowhere\n")
	if _, err := formats.Open(c, formats.OpenOptions{}); err == nil ||
		err.Error() != "Could not open backing file: Could not open '"+filepath.Join(dir, "nowhere")+"': No such file or directory" {
		t.Errorf("missing backing file: %v", err)
	}
}

func TestBackingPath(t *testing.T) {
	for _, tc := range []struct{ parent, name, want string }{
		{"/img/top.qcow2", "base.qcow2", "/img/base.qcow2"},
		{"/img/top.qcow2", "../base.qcow2", "/img/../base.qcow2"},
		{"/img/top.qcow2", "/abs/base.qcow2", "/abs/base.qcow2"},
		{"top.qcow2", "base.qcow2", "base.qcow2"},
		{"dir/top.qcow2", "base.qcow2", "dir/base.qcow2"},
		{"/img/top.qcow2", "nbd://host/export", "nbd://host/export"},
		{"/img/top.qcow2", "json:{\"driver\":\"raw\"}", "json:{\"driver\":\"raw\"}"},
		{"/img/top.qcow2", "sub/x:y", "/img/sub/x:y"}, // a colon after a slash is no protocol
		{"/img/top.qcow2", "", ""},
	} {
		if got := formats.BackingPath(tc.parent, tc.name); got != tc.want {
			t.Errorf("BackingPath(%q, %q) = %q, want %q", tc.parent, tc.name, got, tc.want)
		}
	}
}
