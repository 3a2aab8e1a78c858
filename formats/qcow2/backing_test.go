package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// TestSetBackingMatchesQemu rewrites the backing reference of copies of
// one image with qemu-img rebase -u and with SetBacking: the header
// clusters must come out byte for byte the same.
func TestSetBackingMatchesQemu(t *testing.T) {
	haveQemu(t)
	tests := []struct {
		name, create, backing, format string
	}{
		{"add", "cluster_size=65536", "base.qcow2", "qcow2"},
		{"replace", "cluster_size=65536", "other-base.raw", "raw"},
		{"remove", "cluster_size=65536", "", ""},
		{"v2", "compat=0.10", "base.qcow2", "qcow2"},
		{"small clusters", "cluster_size=512", strings.Repeat("n", 300), "qcow2"},
		{"extended l2", "extended_l2=on", "dir/base.qcow2", "qcow2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
			img := filepath.Join(dir, "img.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.create, "-b", "base.qcow2", "-F", "qcow2", img, "1M")
			qemuIO(t, img, "write -P 5 0 4k")
			ours := filepath.Join(dir, "ours.qcow2")
			copyFile(t, img, ours)

			args := []string{"rebase", "-q", "-u", "-b", tc.backing}
			if tc.format != "" {
				args = append(args, "-F", tc.format)
			}
			execOut(t, "qemu-img", append(args, img)...)

			o, err := formats.Open(ours, formats.OpenOptions{Format: "qcow2", NoBacking: true})
			if err != nil {
				t.Fatal(err)
			}
			if err := o.(formats.BackingChanger).SetBacking(tc.backing, tc.format); err != nil {
				t.Fatal(err)
			}
			if name, format := o.(formats.Backed).BackingInfo(); name != tc.backing || format != tc.format {
				t.Errorf("BackingInfo = %q, %q", name, format)
			}
			if err := o.Close(); err != nil {
				t.Fatal(err)
			}
			want, got := readFile(t, img), readFile(t, ours)
			cs := 1 << binaryClusterBits(want)
			if !bytes.Equal(want[:cs], got[:cs]) {
				t.Errorf("header cluster differs from qemu-img's at byte %d", diffOffset(want[:cs], got[:cs]))
			}
			if len(tc.backing) < 255 {
				// The new backing file must exist for check to open the image.
				if tc.backing != "" {
					if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, tc.backing)), 0o755); err != nil {
						t.Fatal(err)
					}
					execOut(t, "qemu-img", "create", "-q", "-f", tc.format, filepath.Join(dir, tc.backing), "1M")
				}
				mustBeClean(t, ours)
			}
		})
	}
}

func TestSetBackingErrors(t *testing.T) {
	haveQemu(t)
	dir := t.TempDir()
	name := filepath.Join(dir, "small.qcow2")
	execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", name, "1M")
	before := readFile(t, name)
	tests := []struct {
		name, backing, format string
		want                  error
	}{
		{"no room in the header", strings.Repeat("y", 450), "qcow2", syscall.ENOSPC},
		{"name too long", strings.Repeat("y", 1024), "qcow2", syscall.EINVAL},
		{"format without name", "", "qcow2", syscall.EINVAL},
	}
	img := openImg(t, name, false)
	for _, tc := range tests {
		if err := img.SetBacking(tc.backing, tc.format); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
		if n, f := img.BackingInfo(); n != "" || f != "" {
			t.Errorf("%s: failed change left backing %q, %q", tc.name, n, f)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if after := readFile(t, name); !bytes.Equal(before, after) {
		t.Errorf("failed changes modified the file at byte %d", diffOffset(before, after))
	}
	ro := openImg(t, name, true)
	defer ro.Close()
	if err := ro.SetBacking("x", "raw"); !errors.Is(err, formats.ErrReadOnly) {
		t.Errorf("read-only image: got %v", err)
	}
}

// TestMakeEmpty empties images of each kind of cluster and checks that
// the backing file shows through everywhere and that qemu-img agrees.
func TestMakeEmpty(t *testing.T) {
	haveQemu(t)
	for _, opts := range []string{"cluster_size=65536", "compat=0.10", "extended_l2=on", "lazy_refcounts=on"} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
			qemuIO(t, base, "write -P 1 0 4M")
			top := filepath.Join(dir, "top.qcow2")
			execOut(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", top, "4M")
			cmds := []string{"write -P 2 0 64k", "write -P 3 100k 8k", "write -c -P 4 1M 64k", "write -P 5 3M 1M"}
			if opts != "compat=0.10" {
				cmds = append(cmds, "write -z 2M 128k")
			}
			qemuIO(t, top, cmds...)
			if opts == "cluster_size=65536" {
				// A snapshot shares the L2 tables, which must then be copied
				// rather than changed in place.
				execOut(t, "qemu-img", "snapshot", "-c", "snap", top)
			}
			img := openImg(t, top, false)
			if err := img.MakeEmpty(); err != nil {
				t.Fatal(err)
			}
			for off := int64(0); off < img.Size(); {
				e, err := img.BlockStatus(off, img.Size()-off)
				if err != nil {
					t.Fatal(err)
				}
				if e.Status.Allocated() {
					t.Errorf("%d+%d still allocated: %+v", off, e.Length, e)
				}
				off += e.Length
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustBeClean(t, top)
			if want, got := rawOf(t, base), rawOf(t, top); !bytes.Equal(want, got) {
				t.Errorf("emptied image differs from its backing file at %d", diffOffset(want, got))
			}
		})
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	if err := os.WriteFile(to, readFile(t, from), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// binaryClusterBits reads cluster_bits from a header.
func binaryClusterBits(hdr []byte) uint32 {
	return uint32(hdr[20])<<24 | uint32(hdr[21])<<16 | uint32(hdr[22])<<8 | uint32(hdr[23])
}
