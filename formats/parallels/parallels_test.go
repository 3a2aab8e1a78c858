package parallels

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

const format = "parallels"

func TestConformance(t *testing.T) {
	for _, opts := range []string{"", "cluster_size=4k", "cluster_size=64k"} {
		t.Run(opts, func(t *testing.T) {
			formatstest.Run(t, formatstest.Created(format, opts))
		})
	}
}

// TestCreateMatchesQemu: created files are byte-identical to qemu-img's.
func TestCreateMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, c := range []struct{ size, opts string }{
		{"10M", ""},
		{"3M", "cluster_size=4k"},
		{"3M", "cluster_size=1000"},
		{"1000", ""},
		{"0", ""},
		{"100G", "cluster_size=64k"},
		{"5M", "cluster_size=3M"},
	} {
		t.Run(c.size+","+c.opts, func(t *testing.T) {
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours"), filepath.Join(dir, "theirs")
			opts := "size=" + c.size
			if c.opts != "" {
				opts += "," + c.opts
			}
			if err := formatstest.Create(t, format, ours, opts); err != nil {
				t.Fatal(err)
			}
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", format, "-o", opts, theirs)
			a, _ := os.ReadFile(ours)
			b, _ := os.ReadFile(theirs)
			if d := formatstest.FirstDiff(a, b); d >= 0 {
				t.Fatalf("files differ at byte %d (sizes %d, %d)", d, len(a), len(b))
			}
			formatstest.SameInfoAndMap(t, format, ours)
		})
	}
}

func TestCreateErrors(t *testing.T) {
	for _, c := range []struct{ opts, msg string }{
		{"size=3M,cluster_size=0", "Image size is too large for this cluster size"},
		{"size=9000T", "Image size is too large for this cluster size"},
		{"size=1M,cluster_size=4G", "Cluster size is too large"},
		{"size=1M,preallocation=xx", "invalid parameter value: xx"},
	} {
		t.Run(c.opts, func(t *testing.T) {
			err := formatstest.Create(t, format, filepath.Join(t.TempDir(), "x"), c.opts)
			if err == nil || err.Error() != c.msg {
				t.Fatalf("got %v, want %q", err, c.msg)
			}
		})
	}
}

// TestWriteQemuAgrees writes with our driver and checks that qemu-img
// check finds the image clean, reads what we wrote, and reports the same
// info and map.
func TestWriteQemuAgrees(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range []string{"size=3M,cluster_size=64k", "size=5000000,cluster_size=4k", "size=3M,cluster_size=1000"} {
		t.Run(opts, func(t *testing.T) {
			name := filepath.Join(t.TempDir(), "img")
			if err := formatstest.Create(t, format, name, opts); err != nil {
				t.Fatal(err)
			}
			img, err := formats.Open(name, formats.OpenOptions{Format: format})
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, img.Size())
			for i, w := range []struct{ off, n int64 }{{100000, 70000}, {0, 512}, {img.Size() - 700, 700}, {1 << 20, 3}} {
				p := bytes.Repeat([]byte{byte(i + 1)}, int(w.n))
				if _, err := img.WriteAt(p, w.off); err != nil {
					t.Fatal(err)
				}
				copy(want[w.off:], p)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			formatstest.Exec(t, "qemu-img", "check", "-U", "-f", format, name)
			rawName := filepath.Join(t.TempDir(), "raw")
			if err := os.WriteFile(rawName, want, 0o644); err != nil {
				t.Fatal(err)
			}
			formatstest.Exec(t, "qemu-img", "compare", "-U", "-f", format, "-F", "raw", name, rawName)
			if got := formatstest.QemuRaw(t, format, name); !bytes.Equal(got, want) {
				t.Fatalf("qemu-img reads different data at %d", formatstest.FirstDiff(got, want))
			}
			formatstest.SameInfoAndMap(t, format, name)
		})
	}
}

// TestReadQemuWritten reads an image qemu-io wrote, in both catalog
// flavours: the old "WithoutFreeSpace" one is made by rewriting the
// magic and the catalog entries into sectors.
func TestReadQemuWritten(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, old := range []bool{false, true} {
		name := filepath.Join(t.TempDir(), "img")
		formatstest.Exec(t, "qemu-img", "create", "-q", "-f", format, "-o", "cluster_size=64k", name, "2M")
		formatstest.QemuIO(t, format, name, "write -P 7 100k 10k", "write -P 9 0 1k", "write -P 3 1500k 200k")
		if old {
			b, _ := os.ReadFile(name)
			copy(b, magicOld)
			for i := 0; i < 32; i++ {
				e := b[64+4*i:]
				v := uint32(e[0]) | uint32(e[1])<<8 | uint32(e[2])<<16 | uint32(e[3])<<24
				v *= 128
				e[0], e[1], e[2], e[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
			}
			os.WriteFile(name, b, 0o644)
		}
		formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: format, ReadOnly: true}))
		formatstest.SameInfoAndMap(t, format, name)
	}
}

// corrupt returns a fresh 1 MiB image with 64 KiB clusters changed by
// edit.
func corrupt(t *testing.T, edit func(b []byte) []byte) string {
	name := filepath.Join(t.TempDir(), "img")
	if err := formatstest.Create(t, format, name, "size=1M,cluster_size=64k"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(name)
	if err := os.WriteFile(name, edit(b), 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

func TestOpenErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
		kind error
		msg  string
	}{
		{"zero tracks", func(b []byte) []byte { b[28], b[29] = 0, 0; return b }, formats.ErrCorrupt, "Invalid image: Zero sectors per track"},
		{"huge tracks", func(b []byte) []byte { b[31] = 0x7f; return b }, formats.ErrCorrupt, "Invalid image: Too big cluster"},
		{"huge catalog", func(b []byte) []byte { b[35] = 0x40; return b }, formats.ErrCorrupt, "Catalog too large"},
		{"catalog past EOF", func(b []byte) []byte { b[33] = 0x40; return b[:4096] }, formats.ErrCorrupt, "extends past the end"},
		{"size past catalog", func(b []byte) []byte { b[38] = 1; return b }, formats.ErrCorrupt, "exceeds the catalog"},
		{"version", func(b []byte) []byte { b[16] = 3; return b }, formats.ErrWrongFormat, "Image not in Parallels format"},
	} {
		t.Run(c.name, func(t *testing.T) {
			name := corrupt(t, c.edit)
			_, err := formats.Open(name, formats.OpenOptions{Format: format, ReadOnly: true})
			if !errors.Is(err, c.kind) || err == nil || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %v containing %q", err, c.kind, c.msg)
			}
		})
	}
}

// TestCheckMatchesQemu runs Check and qemu-img check on damaged images
// and compares what they report and repair.
func TestCheckMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, c := range []struct {
		name string
		edit func(b []byte) []byte
	}{
		{"clean", func(b []byte) []byte { return b }},
		{"in use", func(b []byte) []byte { b[0x2c], b[0x2d], b[0x2e], b[0x2f] = 0x59, 0x6e, 0x6f, 0x74; return b }},
		{"leak", func(b []byte) []byte { return append(b, make([]byte, 100000)...) }},
		{"outside", func(b []byte) []byte { b[64+4*5] = 100; return b }},
		{"fragmented", func(b []byte) []byte {
			b[64], b[68], b[72] = 3, 1, 2
			return append(b, make([]byte, 3*65536)...)
		}},
	} {
		for _, mode := range []formats.CheckMode{formats.CheckReadOnly, formats.CheckFixLeaks, formats.CheckFixAll} {
			t.Run(c.name, func(t *testing.T) {
				ours := corrupt(t, c.edit)
				theirs := ours + ".q"
				b, _ := os.ReadFile(ours)
				os.WriteFile(theirs, b, 0o644)
				img, err := formats.Open(ours, formats.OpenOptions{Format: format, ReadOnly: mode == formats.CheckReadOnly, Check: true})
				if err != nil {
					t.Fatal(err)
				}
				var msgs strings.Builder
				res, err := img.(formats.Checker).Check(context.Background(), mode, func(m string) { msgs.WriteString(m) })
				if err != nil {
					t.Fatal(err)
				}
				img.Close()
				args := []string{"check", "--output=json", "-f", format}
				switch mode {
				case formats.CheckFixLeaks:
					args = append(args, "-r", "leaks")
				case formats.CheckFixAll:
					args = append(args, "-r", "all")
				}
				out, stderr := runCheck(t, append(args, theirs)...)
				if msgs.String() != stderr {
					t.Errorf("mode %d messages:\n%q\nqemu:\n%q", mode, msgs.String(), stderr)
				}
				for _, f := range []struct {
					key string
					v   int64
				}{{"corruptions", res.Corruptions - res.CorruptionsFixed}, {"leaks", res.Leaks - res.LeaksFixed},
					{"corruptions-fixed", res.CorruptionsFixed}, {"leaks-fixed", res.LeaksFixed},
					{"image-end-offset", res.ImageEndOffset}, {"allocated-clusters", res.AllocatedClusters},
					{"fragmented-clusters", res.FragmentedClusters}, {"total-clusters", res.TotalClusters}} {
					if got := jsonInt(out, f.key); got != f.v {
						t.Errorf("mode %d %s: qemu %d, ours %d\n%s", mode, f.key, got, f.v, out)
					}
				}
				a, _ := os.ReadFile(ours)
				q, _ := os.ReadFile(theirs)
				if d := formatstest.FirstDiff(a, q); d >= 0 {
					t.Errorf("mode %d: repaired files differ at %d (sizes %d, %d)", mode, d, len(a), len(q))
				}
			})
		}
	}
}

// runCheck runs qemu-img check, which exits non-zero on findings, and
// returns its stdout and stderr.
func runCheck(t *testing.T, args ...string) (string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command("qemu-img", args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatal(err)
		}
	}
	return out.String(), errb.String()
}

// jsonInt returns a number of a JSON object, 0 when absent.
func jsonInt(s, key string) int64 {
	var m map[string]any
	if json.Unmarshal([]byte(s), &m) != nil {
		return -1
	}
	f, _ := m[key].(float64)
	return int64(f)
}
