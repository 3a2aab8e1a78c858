package vpc

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// The conformance suite needs the exact size it asks for, which only
// force_size gives (otherwise the size is rounded to a CHS geometry);
// dynamic images with and without force_size share every code path but
// the size calculation, which TestCreateMatchesQemu covers.
func TestConformance(t *testing.T) {
	for _, opts := range []string{"force_size=on", "force_size=on,subformat=fixed"} {
		t.Run(opts, func(t *testing.T) { formatstest.Run(t, formatstest.Created("vpc", opts)) })
	}
}

func TestGeometry(t *testing.T) {
	tests := []struct {
		sectors int64
		c       uint16
		h, s    uint8
	}{
		{0, 0, 4, 17},
		{20480, 301, 4, 17},               // 10 MiB
		{4 << 20, 4161, 16, 63},           // 2 GiB: the byte-sized head count wraps
		{65535 * 16 * 63, 16191, 16, 255}, // the 255-sector branch starts here
		{maxGeometry + 5, 65535, 16, 255},
		{16 * 1024 * 63, 1024, 16, 63},
	}
	for _, tc := range tests {
		c, h, s := geometry(tc.sectors)
		if c != tc.c || h != tc.h || s != tc.s {
			t.Errorf("geometry(%d) = %d/%d/%d, want %d/%d/%d", tc.sectors, c, h, s, tc.c, tc.h, tc.s)
		}
	}
}

// qemuVariants are the creation options the differential tests cover.
var qemuVariants = []string{"", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"}

// TestReadQemuImages reads images qemu-img made and qemu-io wrote (data,
// write -z, a partial last block) and compares them with qemu-img's raw
// conversion, and info and map with qemu-img's.
func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range qemuVariants {
		t.Run("opts="+opts, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "img.vhd")
			args := []string{"create", "-q", "-f", "vpc", name, "11M"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			formatstest.Exec(t, "qemu-img", args...)
			formatstest.QemuIO(t, "vpc", name, "write -P 1 1M 4k", "write -z 5M 4k", "write -P 2 2047k 2k", "write -P 3 10M 900k", "write -P 4 0 512")
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, name, formats.OpenOptions{Format: "vpc", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "vpc", name)
		})
	}
}

// TestWriteCheckedByQemu writes through our driver into images made by
// qemu-img and by us and has qemu-img read them back.
func TestWriteCheckedByQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, opts := range qemuVariants {
		for _, maker := range []string{"qemu", "imgfs"} {
			t.Run(maker+"/opts="+opts, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				name := filepath.Join(dir, "img.vhd")
				if maker == "qemu" {
					args := []string{"create", "-q", "-f", "vpc", name, "9M"}
					if opts != "" {
						args = append(args, "-o", opts)
					}
					formatstest.Exec(t, "qemu-img", args...)
				} else if err := formatstest.Create(t, "vpc", name, joinOpts("size=9M", opts)); err != nil {
					t.Fatal(err)
				}
				img := formatstest.Open(t, name, formats.OpenOptions{Format: "vpc"})
				want := make([]byte, img.Size())
				for i, w := range []struct{ off, n int64 }{
					{0, 100}, {2<<20 - 7, 20}, {3 << 20, 3 << 20}, {img.Size() - 1000, 1000}, {50, 10},
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
				if i := formatstest.FirstDiff(formatstest.QemuRaw(t, "vpc", name), want); i >= 0 {
					t.Fatalf("qemu-img reads byte %d differently", i)
				}
				formatstest.SameInfoAndMap(t, "vpc", name)
			})
		}
	}
}

func joinOpts(a, b string) string {
	if b == "" {
		return a
	}
	return a + "," + b
}

// TestCreateMatchesQemu creates images of awkward sizes with both tools:
// the virtual sizes (after CHS rounding), the file sizes and qemu-img
// compare must agree.
func TestCreateMatchesQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	for _, size := range []string{"0", "1000", "1M", "10M", "127M", "1G", "130G", "200G"} {
		for _, opts := range qemuVariants {
			if strings.Contains(opts, "fixed") && (strings.HasSuffix(size, "G") || size == "0") {
				// Large: a sparse file with nothing new to learn. Empty: the
				// footer is the whole file, so QEMU (and imgfs) take it for
				// the copy at the start of a dynamic disk and cannot open it.
				continue
			}
			ours, theirs := filepath.Join(dir, "ours.vhd"), filepath.Join(dir, "theirs.vhd")
			os.Remove(ours)
			os.Remove(theirs)
			all := joinOpts("size="+size, opts)
			if err := formatstest.Create(t, "vpc", ours, all); err != nil {
				t.Fatalf("create %s: %v", all, err)
			}
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", all, theirs)
			a, b := formatstest.QemuVirtualSize(t, "vpc", ours), formatstest.QemuVirtualSize(t, "vpc", theirs)
			if a != b {
				t.Errorf("%s: virtual size %d, qemu-img made %d", all, a, b)
			}
			if img := formatstest.Open(t, ours, formats.OpenOptions{Format: "vpc", ReadOnly: true}); img.Size() != a {
				t.Errorf("%s: we read size %d, qemu-img %d", all, img.Size(), a)
			}
			sa, _ := os.Stat(ours)
			sb, _ := os.Stat(theirs)
			if sa.Size() != sb.Size() {
				t.Errorf("%s: file size %d, qemu-img's %d", all, sa.Size(), sb.Size())
			}
			formatstest.Exec(t, "qemu-img", "compare", "-U", "-f", "vpc", "-F", "vpc", ours, theirs)
		}
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		opts, msg  string
		leavesFile bool
	}{
		{"size=1M,subformat=foo", "Parameter 'subformat' does not accept value 'foo'", true},
		{"size=3T", "Disk size is too large, max size is 2040 GiB", true},
		{"size=2041G,force_size=on", "Disk size is too large, max size is 2040 GiB", true},
		{"size=1M,preallocation=foo", "invalid parameter value: foo", false},
		{"size=1M,extent_size_hint=8G", "Extent size hint is too large", false},
	} {
		name := filepath.Join(dir, "x.vhd")
		os.Remove(name)
		err := formatstest.Create(t, "vpc", name, tc.opts)
		if err == nil || err.Error() != tc.msg {
			t.Errorf("%s: %v, want %q", tc.opts, err, tc.msg)
		}
		if _, serr := os.Stat(name); (serr == nil) != tc.leavesFile {
			t.Errorf("%s: file left behind: %v, want %v", tc.opts, serr == nil, tc.leavesFile)
		}
	}
}

// footerAt is where a test image's footer lives: at the start of a
// dynamic image (QEMU reads that copy), at the end of a fixed one.
func footerAt(t *testing.T, name string) int64 {
	b := make([]byte, 8)
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.ReadAt(b, 0)
	if isFooter(b) {
		return 0
	}
	st, _ := f.Stat()
	return st.Size() - footerSize
}

// patchFooter rewrites a test image's footer and fixes its checksum.
func patchFooter(t *testing.T, name string, change func(*Footer)) {
	t.Helper()
	formatstest.Patch(t, name, footerAt(t, name), footerSize, func(b []byte) {
		ft := decodeFooter(b)
		change(ft)
		ft.Checksum = ft.footerChecksum()
		copy(b, ft.encode())
	})
}

// TestSizeRules hand-crafts footers of different creator applications,
// geometries and current sizes and compares the virtual size qemu-img
// info reports with ours, by the creator's rule and with each
// force_size_calc override.
func TestSizeRules(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, sub := range []string{"dynamic", "fixed"} {
		for _, tc := range []struct {
			app         string
			c           uint16
			h, s        uint8
			currentSize uint64
		}{
			{"vpc ", 20, 16, 63, 30 << 20},
			{"qemu", 20, 16, 63, 30 << 20},
			{"win ", 20, 16, 63, 30 << 20},
			{"qem2", 20, 16, 63, 30<<20 + 700}, // not whole sectors: rounds down
			{"d2v ", 20, 16, 63, 30 << 20},
			{"CTXS", 20, 16, 63, 30 << 20},
			{"tap\x00", 20, 16, 63, 30 << 20},
			{"tap ", 20, 16, 63, 30 << 20},
			{"wa\x00\x00", 20, 16, 63, 30 << 20}, // Azure: CHS in 7.2
			{"vpc ", 65535, 16, 255, 30 << 20},   // the largest geometry means current size
			{"win ", 0, 0, 0, 3 << 20},
		} {
			t.Run(fmt.Sprintf("%s/%q/%d", sub, tc.app, tc.currentSize), func(t *testing.T) {
				t.Parallel()
				name := filepath.Join(t.TempDir(), "img.vhd")
				formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat="+sub, name, "32M")
				patchFooter(t, name, func(ft *Footer) {
					copy(ft.CreatorApp[:], tc.app)
					ft.Cylinders, ft.Heads, ft.SecsPerCyl = tc.c, tc.h, tc.s
					ft.CurrentSize = tc.currentSize
				})
				for _, calc := range []string{"", "chs", "current_size"} {
					want := formatstest.QemuVirtualSize(t, "vpc", name)
					var runtime map[string]string
					if calc != "" {
						want = qemuVirtualSizeOpts(t, "driver=vpc,force_size_calc="+calc+",file.filename="+name)
						runtime = map[string]string{"force_size_calc": calc}
					}
					img := formatstest.Open(t, name, formats.OpenOptions{Format: "vpc", ReadOnly: true, Runtime: runtime})
					if got := img.Size(); got != want {
						t.Errorf("force_size_calc=%s: size %d, qemu-img says %d", calc, got, want)
					}
					img.Close()
				}
			})
		}
	}
}

// qemuVirtualSizeOpts is the virtual size qemu-img info reports for an
// image given by --image-opts.
func qemuVirtualSizeOpts(t *testing.T, imageOpts string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	out := formatstest.Exec(t, "qemu-img", "info", "-U", "--output=json", "--image-opts", imageOpts)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// TestSizeCalcErrors compares the refusal of bad force_size_calc values
// and unknown options with qemu-img's.
func TestSizeCalcErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	name := filepath.Join(t.TempDir(), "img.vhd")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vpc", name, "8M")
	for _, tc := range []struct{ list, key, value string }{
		{"force_size_calc=x", "force_size_calc", "x"},
		{"force_size_calc=CHS", "force_size_calc", "CHS"},
		{"force_size_calc=", "force_size_calc", ""},
		{"force_size=on", "force_size", "on"},
	} {
		imageOpts := "driver=vpc," + tc.list + ",file.filename=" + name
		out, err := exec.Command("qemu-img", "info", "-U", "--image-opts", imageOpts).CombinedOutput()
		if err == nil {
			t.Fatalf("qemu-img accepts %s", imageOpts)
		}
		_, ours := formatstest.OpenRetry(name, formats.OpenOptions{Format: "vpc", ReadOnly: true,
			Runtime: map[string]string{tc.key: tc.value}})
		if ours == nil {
			t.Fatalf("we accept %s", tc.list)
		}
		if want := fmt.Sprintf("qemu-img: Could not open '%s': %v\n", imageOpts, ours); string(out) != want {
			t.Errorf("qemu-img says\n%s ours\n%s", out, want)
		}
	}
}

// TestOpenErrors damages images and compares our error with the one
// qemu-img info reports.
func TestOpenErrors(t *testing.T) {
	formatstest.RequireQemu(t)
	be := binary.BigEndian
	tests := []struct {
		name   string
		opts   string
		damage func(t *testing.T, name string)
		kind   error
	}{
		{"checksum", "", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 64, 1, func(b []byte) { b[0]++ })
		}, formats.ErrCorrupt},
		{"header magic", "", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 512, 1, func(b []byte) { b[0] = 'X' })
		}, formats.ErrCorrupt},
		{"block size", "", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 512+32, 4, func(b []byte) { be.PutUint32(b, 1000) })
		}, formats.ErrCorrupt},
		{"small table", "", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 512+28, 4, func(b []byte) { be.PutUint32(b, 2) })
		}, formats.ErrCorrupt},
		{"huge table", "", func(t *testing.T, name string) {
			formatstest.Patch(t, name, 512+28, 4, func(b []byte) { be.PutUint32(b, 0x80000000) })
		}, formats.ErrCorrupt},
		{"truncated", "", func(t *testing.T, name string) {
			formatstest.QemuIO(t, "vpc", name, "write 4M 4k")
			st, _ := os.Stat(name)
			os.Truncate(name, st.Size()-4096)
		}, formats.ErrCorrupt},
		{"too large", "", func(t *testing.T, name string) {
			patchFooter(t, name, func(ft *Footer) { copy(ft.CreatorApp[:], "win "); ft.CurrentSize = 3 << 40 })
		}, formats.ErrUnsupported},
		{"no footer", "subformat=fixed", func(t *testing.T, name string) {
			st, _ := os.Stat(name)
			formatstest.Patch(t, name, st.Size()-512, 1, func(b []byte) { b[0] = 'X' })
		}, formats.ErrWrongFormat},
		{"tiny", "subformat=fixed", func(t *testing.T, name string) {
			os.Truncate(name, 100)
		}, formats.ErrWrongFormat},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := filepath.Join(t.TempDir(), "img.vhd")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", joinOpts("size=8M", tc.opts), name)
			tc.damage(t, name)
			out, err := exec.Command("qemu-img", "info", "-U", "-f", "vpc", name).CombinedOutput()
			if err == nil {
				t.Fatalf("qemu-img opens the damaged image:\n%s", out)
			}
			_, ours := formatstest.OpenRetry(name, formats.OpenOptions{Format: "vpc", ReadOnly: true})
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
