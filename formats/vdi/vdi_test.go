package vdi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

func TestConformance(t *testing.T) {
	for _, opts := range []string{"static=off", "static=on"} {
		t.Run(opts, func(t *testing.T) { formatstest.Run(t, formatstest.Created("vdi", opts)) })
	}
}

// TestReadQemuImages reads images qemu-img made and qemu-io wrote (data,
// write -z, a partial last block) and compares them with qemu-img's raw
// conversion, and info, map and check with qemu-img's.
func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, static := range []string{"off", "on"} {
		t.Run("static="+static, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "img.vdi")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", "-o", "static="+static, name, "5500k")
			formatstest.QemuIO(t, "vdi", name, "write -P 1 1M 4k", "write -z 3M 4k", "write -P 2 1023k 2k", "write -P 3 5M 300k", "write -P 4 0 512")
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vdi", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "vdi", name)
			compareCheck(t, name)
		})
	}
}

// TestWriteCheckedByQemu writes through our driver into images made by
// qemu-img and by us; qemu-img must find them clean and read our data.
func TestWriteCheckedByQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, static := range []string{"off", "on"} {
		for _, maker := range []string{"qemu", "imgfs"} {
			t.Run(maker+"/static="+static, func(t *testing.T) {
				t.Parallel()
				name := filepath.Join(t.TempDir(), "img.vdi")
				if maker == "qemu" {
					formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", "-o", "static="+static, name, "5M")
				} else if err := formatstest.Create(t, "vdi", name, "size=5M,static="+static); err != nil {
					t.Fatal(err)
				}
				img := formatstest.Open(t, name, formats.OpenOptions{Format: "vdi"})
				want := make([]byte, img.Size())
				// Out of order, so that block map entries and guest blocks
				// differ.
				for i, w := range []struct{ off, n int64 }{
					{4<<20 + 5, 100}, {1<<20 - 7, 20}, {0, 3000}, {2 << 20, 1 << 20}, {img.Size() - 1000, 1000},
				} {
					p := bytes.Repeat([]byte{byte(i + 1)}, int(w.n))
					if _, err := img.WriteAt(p, w.off); err != nil {
						t.Fatal(err)
					}
					copy(want[w.off:], p)
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
				if out := formatstest.Exec(t, "qemu-img", "check", "-U", "-f", "vdi", name); out != "No errors were found on the image.\n" {
					t.Errorf("qemu-img check:\n%s", out)
				}
				if i := formatstest.FirstDiff(formatstest.QemuRaw(t, "vdi", name), want); i >= 0 {
					t.Fatalf("qemu-img reads byte %d differently", i)
				}
				formatstest.SameInfoAndMap(t, "vdi", name)
			})
		}
	}
}

// TestCreateMatchesQemu creates images with both tools; virtual sizes,
// file sizes and content must agree.
func TestCreateMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	for _, size := range []string{"0", "1000", "1M", "3M", "5000k", "200G"} {
		for _, opts := range []string{"static=off", "static=on"} {
			if opts == "static=on" && size == "200G" {
				continue
			}
			ours, theirs := filepath.Join(dir, "ours.vdi"), filepath.Join(dir, "theirs.vdi")
			os.Remove(ours)
			os.Remove(theirs)
			all := "size=" + size + "," + opts
			if err := formatstest.Create(t, "vdi", ours, all); err != nil {
				t.Fatalf("create %s: %v", all, err)
			}
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", "-o", all, theirs)
			if a, b := formatstest.QemuVirtualSize(t, "vdi", ours), formatstest.QemuVirtualSize(t, "vdi", theirs); a != b {
				t.Errorf("%s: virtual size %d, qemu-img made %d", all, a, b)
			}
			sa, _ := os.Stat(ours)
			sb, _ := os.Stat(theirs)
			if sa.Size() != sb.Size() {
				t.Errorf("%s: file size %d, qemu-img's %d", all, sa.Size(), sb.Size())
			}
			formatstest.Exec(t, "qemu-img", "compare", "-U", "-f", "vdi", "-F", "vdi", ours, theirs)
			if out := formatstest.Exec(t, "qemu-img", "check", "-U", "-f", "vdi", ours); out != "No errors were found on the image.\n" {
				t.Errorf("%s: qemu-img check:\n%s", all, out)
			}
		}
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		opts, msg  string
		leavesFile bool
	}{
		{"size=600T", "Unsupported VDI image size (size is 0x2580000000000, max supported is 0x1fffff8000000)", true},
		{"size=1M,preallocation=foo", "invalid parameter value: foo", false},
		{"size=1M,extent_size_hint=8G", "Extent size hint is too large", false},
	} {
		name := filepath.Join(dir, "x.vdi")
		os.Remove(name)
		err := formatstest.Create(t, "vdi", name, tc.opts)
		if err == nil || err.Error() != tc.msg {
			t.Errorf("%s: %v, want %q", tc.opts, err, tc.msg)
		}
		if _, serr := os.Stat(name); (serr == nil) != tc.leavesFile {
			t.Errorf("%s: file left behind: %v, want %v", tc.opts, serr == nil, tc.leavesFile)
		}
	}
}

// put32 returns a patch that stores v at a header offset.
func put32(t *testing.T, off int64, v uint32) func(*testing.T, string) {
	return func(t *testing.T, name string) {
		formatstest.Patch(t, name, off, 4, func(b []byte) { binary.LittleEndian.PutUint32(b, v) })
	}
}

// TestOpenErrors damages headers and compares our error with qemu-img's.
func TestOpenErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	tests := []struct {
		name   string
		damage func(*testing.T, string)
		kind   error
	}{
		{"signature", put32(t, 0x40, 0x12345678), formats.ErrWrongFormat},
		{"version", put32(t, 0x44, 0x00010000), formats.ErrUnsupported},
		{"bmap offset", put32(t, 0x154, 0x201), formats.ErrUnsupported},
		{"data offset", put32(t, 0x158, 0x401), formats.ErrUnsupported},
		{"sector size", put32(t, 0x168, 4096), formats.ErrUnsupported},
		{"block size", put32(t, 0x178, 2<<20), formats.ErrUnsupported},
		{"disk size", put32(t, 0x180, 2), formats.ErrUnsupported},
		{"huge disk", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 0x170, 8, func(b []byte) { binary.LittleEndian.PutUint64(b, 1<<50) })
		}, formats.ErrUnsupported},
		{"blocks", put32(t, 0x180, maxBlocksQEMU+1), formats.ErrUnsupported},
		{"link", put32(t, 0x1a8, 1), formats.ErrUnsupported},
		{"parent", put32(t, 0x1bc, 1), formats.ErrUnsupported},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "img.vdi")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", name, "3M")
			tc.damage(t, name)
			out, err := exec.Command("qemu-img", "info", "-U", "-f", "vdi", name).CombinedOutput()
			if err == nil {
				t.Fatalf("qemu-img opens the damaged image:\n%s", out)
			}
			_, ours := formatstest.OpenRetry(name, formats.OpenOptions{Format: "vdi", ReadOnly: true})
			if ours == nil {
				t.Fatal("we open the damaged image")
			}
			if !errors.Is(ours, tc.kind) {
				t.Errorf("error %v does not wrap %v", ours, tc.kind)
			}
			if want := fmt.Sprintf("qemu-img: Could not open '%s': %v\n", name, ours); string(out) != want {
				t.Errorf("qemu-img says\n%s ours\n%s", out, want)
			}
		})
	}
}

// TestCheck corrupts the block map and the allocated count and compares
// our check (stdout, stderr lines and exit code as qemu-img prints them)
// with qemu-img check.
func TestCheck(t *testing.T) {
	formatstest.RequireQemu(t)
	entry := func(i int64, v uint32) func(*testing.T, string) { return put32(t, 512+4*i, v) }
	tests := []struct {
		name   string
		damage []func(*testing.T, string)
	}{
		{"clean", nil},
		{"count", []func(*testing.T, string){put32(t, 0x184, 7)}},
		{"too large", []func(*testing.T, string){entry(3, 9)}},
		{"shared", []func(*testing.T, string){entry(3, 0)}},
		{"several", []func(*testing.T, string){entry(3, 1), entry(4, 1), entry(5, 100), put32(t, 0x184, 0)}},
		{"discarded", []func(*testing.T, string){entry(1, discardedEntry), put32(t, 0x184, 1)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "img.vdi")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", name, "6M")
			formatstest.QemuIO(t, "vdi", name, "write 0 1k", "write 1M 1k")
			for _, d := range tc.damage {
				d(t, name)
			}
			compareCheck(t, name)
		})
	}
}

// compareCheck runs qemu-img check (human and JSON) and our check on an
// image and compares stdout, stderr and the exit code.
func compareCheck(t *testing.T, name string) {
	t.Helper()
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "vdi", ReadOnly: true})
	for _, asJSON := range []bool{false, true} {
		args := []string{"check", "-U", "-f", "vdi", name}
		if asJSON {
			args = append(args, "--output=json")
		}
		cmd := exec.Command("qemu-img", args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		code := 0
		if err := cmd.Run(); err != nil {
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatal(err)
			}
			code = ee.ExitCode()
		}
		var ourErr strings.Builder
		rep, err := control.Check(context.Background(), control.CheckOptions{Image: img, Filename: name,
			Report: func(msg string) { ourErr.WriteString(msg) }})
		if err != nil {
			t.Fatal(err)
		}
		out := rep.Human()
		if asJSON {
			out = rep.JSON()
		}
		if out != stdout.String() || ourErr.String() != stderr.String() || rep.ExitCode() != code {
			t.Errorf("qemu-img %s: exit %d\n%s%s\nours: exit %d\n%s%s", strings.Join(args, " "),
				code, stdout.String(), stderr.String(), rep.ExitCode(), out, ourErr.String())
		}
	}
	if _, err := img.(formats.Checker).Check(context.Background(), formats.CheckFixAll, nil); !errors.Is(err, formats.ErrUnsupported) {
		t.Errorf("check -r all: %v, want ErrUnsupported", err)
	}
}

// TestAllocationOrder checks that new blocks are placed at the index the
// header's allocated count gives, as QEMU places them, so that the file
// and its block map match what qemu-io makes of the same writes.
func TestAllocationOrder(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	ours, theirs := filepath.Join(dir, "ours.vdi"), filepath.Join(dir, "theirs.vdi")
	if err := formatstest.Create(t, "vdi", ours, "size=4M"); err != nil {
		t.Fatal(err)
	}
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vdi", theirs, "4M")
	formatstest.QemuIO(t, "vdi", theirs, "write -P 1 3M 1k", "write -P 2 1M 1k")
	img := formatstest.Open(t, ours, formats.OpenOptions{Format: "vdi"})
	for _, w := range []struct {
		off int64
		v   byte
	}{{3 << 20, 1}, {1 << 20, 2}} {
		if _, err := img.WriteAt(bytes.Repeat([]byte{w.v}, 1024), w.off); err != nil {
			t.Fatal(err)
		}
	}
	img.Close()
	a, _ := os.ReadFile(ours)
	b, _ := os.ReadFile(theirs)
	// Everything but the UUIDs must be equal.
	clear(a[0x188:0x1a8])
	clear(b[0x188:0x1a8])
	if i := formatstest.FirstDiff(a, b); i >= 0 {
		t.Errorf("files differ at byte %d (sizes %d, %d)", i, len(a), len(b))
	}
}

func TestProbe(t *testing.T) {
	hdr := make([]byte, headerSize)
	binary.LittleEndian.PutUint32(hdr[0x40:], signature)
	if got := probe(hdr, ""); got != 100 {
		t.Errorf("probe of a VDI header = %d, want 100", got)
	}
	if got := probe(hdr[:100], ""); got != 0 {
		t.Errorf("probe of a short buffer = %d, want 0", got)
	}
	hdr[0x40]++
	if got := probe(hdr, ""); got != 0 {
		t.Errorf("probe of a bad signature = %d, want 0", got)
	}
}

// TestAllocateBeyondMap refuses to allocate when the header claims every
// block is taken, instead of writing an entry that means "unallocated".
func TestAllocateBeyondMap(t *testing.T) {
	name := filepath.Join(t.TempDir(), "img.vdi")
	if err := formatstest.Create(t, "vdi", name, "size=2M"); err != nil {
		t.Fatal(err)
	}
	formatstest.Patch(t, name, 0x184, 4, func(b []byte) { binary.LittleEndian.PutUint32(b, 2) })
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "vdi"})
	if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, formats.ErrCorrupt) {
		t.Errorf("write: %v, want ErrCorrupt", err)
	}
}
