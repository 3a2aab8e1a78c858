package qed

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/qcow2"
	_ "github.com/imgfs/imgfs/formats/raw"
)

func TestConformance(t *testing.T) {
	for _, opts := range []string{"cluster_size=4k", "cluster_size=4k,table_size=2", ""} {
		t.Run(opts, func(t *testing.T) { formatstest.Run(t, formatstest.Created("qed", opts)) })
	}
}

// qemuWrites write data, aligned and unaligned zeroes, runs of clusters
// and the partial last cluster of a 5000.5k image.
var qemuWrites = []string{
	"write -P 1 0 4k", "write -P 2 200k 70k", "write -z 1M 64k", "write -z 2M 1k",
	"write -P 3 1M 1k", "write -z 0 64k", "write -P 4 5000k 512", "write -P 5 3M 200k",
}

// TestReadQemuImages reads images qemu-img made and qemu-io wrote, with
// and without backing files, and compares them with qemu-img's raw
// conversion, and info, map and check with qemu-img's.
func TestReadQemuImages(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.qed")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qed", plain, "5000.5k")
	formatstest.QemuIO(t, "qed", plain, qemuWrites...)
	small := filepath.Join(dir, "small.qed")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", small, "3M")
	formatstest.QemuIO(t, "qed", small, "write -P 1 1000 10k", "write -z 8k 8k", "write -P 2 2M 1M")

	base := filepath.Join(dir, "base.raw")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", base, "4M")
	formatstest.QemuIO(t, "raw", base, "write -P 9 0 4M")
	overRaw := filepath.Join(dir, "over-raw.qed")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", overRaw, "5M")
	formatstest.QemuIO(t, "qed", overRaw, "write -P 1 5000 3000", "write -z 1M 64k", "write -P 2 4M 100k")
	base2 := filepath.Join(dir, "base.qcow2")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", base2, "2M")
	formatstest.QemuIO(t, "qcow2", base2, "write -P 7 64k 1M")
	overQcow2 := filepath.Join(dir, "over-qcow2.qed")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", overQcow2)
	formatstest.QemuIO(t, "qed", overQcow2, "write -P 1 100k 10k")
	for _, n := range []string{plain, small, overRaw, overQcow2} {
		t.Run(filepath.Base(n), func(t *testing.T) {
			formatstest.SameAsQemuRaw(t, formatstest.Open(t, n, formats.OpenOptions{Format: "qed", ReadOnly: true}))
			formatstest.SameInfoAndMap(t, "qed", n)
			compareCheck(t, n)
		})
	}
}

// TestCreateIdentical creates images with qemu-img and with us and
// compares the files byte for byte.
func TestCreateIdentical(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, c := range []struct{ opts, size string }{
		{"", "10M"}, {"", "1000"}, {"", "0"},
		{"cluster_size=4k,table_size=1", "3M"},
		{"cluster_size=1M,table_size=16", "1T"},
		{"backing_file=base.raw,backing_fmt=raw", "5M"},
		{"backing_file=base.raw,backing_fmt=qcow2", "5M"},
	} {
		t.Run(c.opts+"/"+c.size, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.qed"), filepath.Join(dir, "theirs.qed")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "5M")
			args := []string{"create", "-q", "-f", "qed", "-u"}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			formatstest.Exec(t, "qemu-img", append(args, theirs, c.size)...)
			opts := "size=" + c.size
			if c.opts != "" {
				opts += "," + c.opts
			}
			if err := formatstest.Create(t, "qed", ours, opts); err != nil {
				t.Fatal(err)
			}
			formatstest.SameFiles(t, ours, theirs)
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ opts, msg string }{
		{"size=1M,cluster_size=1000", "QED cluster size must be within range [4096, 67108864] and power of 2"},
		{"size=1M,cluster_size=128M", "QED cluster size must be within range [4096, 67108864] and power of 2"},
		{"size=1M,table_size=3", "QED table size must be within range [1, 16] and power of 2"},
		{"size=1M,table_size=0", "QED table size must be within range [1, 16] and power of 2"},
		{"size=1T,cluster_size=4k,table_size=1", "QED image size must be a non-zero multiple of cluster size and less than 1073741824 bytes"},
		{"size=1M,backing_fmt=nosuch,backing_file=x", "Parameter 'backing-fmt' does not accept value 'nosuch'"},
	} {
		err := formatstest.Create(t, "qed", filepath.Join(dir, "x.qed"), c.opts)
		if err == nil || err.Error() != c.msg {
			t.Errorf("%s: got %v, want %q", c.opts, err, c.msg)
		}
	}
}

// TestWriteLikeQemu writes the same data with qemu-io into a qemu-img
// image and with our driver into ours: the files must be identical,
// clean for qemu-img check and equal for qemu-img compare.
func TestWriteLikeQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	type w struct {
		off, n int64
		zero   bool
	}
	writes := []w{{5000, 3000, false}, {200 << 10, 70 << 10, false}, {1 << 20, 64 << 10, true},
		{2 << 20, 1 << 10, true}, {1 << 20, 1 << 10, false}, {0, 64 << 10, true}, {3 << 20, 200 << 10, false},
		{4<<20 + 1000, 1 << 20, false}}
	for _, backed := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "backed"}[backed], func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "raw", base, "3M")
			formatstest.QemuIO(t, "raw", base, "write -P 9 0 3M")
			theirs, ours := filepath.Join(dir, "theirs.qed"), filepath.Join(dir, "ours.qed")
			opts, qargs := "size=6M", []string{"create", "-q", "-f", "qed", theirs, "6M"}
			if backed {
				opts += ",backing_file=base.raw,backing_fmt=raw"
				qargs = []string{"create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", theirs, "6M"}
			}
			formatstest.Exec(t, "qemu-img", qargs...)
			if err := formatstest.Create(t, "qed", ours, opts); err != nil {
				t.Fatal(err)
			}
			img := formatstest.Open(t, ours, formats.OpenOptions{Format: "qed"})
			var cmds []string
			for i, w := range writes {
				if backed && i == 4 {
					// QEMU fills the rest of a zero cluster that a partial
					// write allocates from the backing file, so the guest
					// sees backing data where it wrote zeroes; imgfs keeps
					// the zeroes (TestPartialWriteToZeroCluster).
					continue
				}
				off, n := strconv.FormatInt(w.off, 10), strconv.FormatInt(w.n, 10)
				var err error
				if w.zero {
					cmds = append(cmds, "write -z "+off+" "+n)
					err = img.(formats.Zeroer).WriteZeroes(w.off, w.n, false)
				} else {
					cmds = append(cmds, "write -P "+strconv.Itoa(i+1)+" "+off+" "+n)
					_, err = img.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, int(w.n)), w.off)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			formatstest.QemuIO(t, "qed", theirs, cmds...)
			formatstest.SameFiles(t, ours, theirs)
			formatstest.Exec(t, "qemu-img", "check", "-U", ours)
			formatstest.Exec(t, "qemu-img", "compare", "-U", ours, theirs)
			formatstest.SameInfoAndMap(t, "qed", ours)
		})
	}
}

// TestNeedCheck damages an image as a crash and a bad write could (the
// need-check bit set, a leaked cluster, an L2 entry past the end of the
// file, a cluster referenced twice) and compares check, repair and the
// repair on a read-write open with qemu-img's.
func TestNeedCheck(t *testing.T) {
	formatstest.RequireQemu(t)
	dir := t.TempDir()
	damaged := filepath.Join(dir, "damaged.qed")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", damaged, "2M")
	formatstest.QemuIO(t, "qed", damaged, "write -P 1 0 12k", "write -P 2 1M 4k")
	b, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	h := decodeHeader(b)
	h.Features |= featNeedCheck
	copy(b, h.encode())
	l2 := int64(binary.LittleEndian.Uint64(b[h.L1TableOffset:]))
	binary.LittleEndian.PutUint64(b[l2+8:], 1<<40)                                     // past the end
	binary.LittleEndian.PutUint64(b[l2+16:], binary.LittleEndian.Uint64(b[l2+8*256:])) // twice
	b = append(b, make([]byte, 8192)...)                                               // two leaks
	for _, n := range []string{"ours.qed", "theirs.qed", "open.qed", "qopen.qed"} {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	compareCheck(t, filepath.Join(dir, "ours.qed"))
	sameInfo(t, filepath.Join(dir, "ours.qed"))

	// Repair with -r all, by us and by qemu-img.
	img, err := formats.Open(filepath.Join(dir, "ours.qed"), formats.OpenOptions{Format: "qed", Check: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := img.(formats.Checker).Check(t.Context(), formats.CheckFixAll, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	// The entry past the end is fixed; the doubly referenced cluster
	// stays a corruption QED cannot repair.
	if res.CorruptionsFixed != 1 || res.Corruptions != 1 {
		t.Errorf("repair: %+v", res)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// Exit status 2: the corruption QED cannot repair remains.
	var ee *exec.ExitError
	if err := exec.Command("qemu-img", "check", "-r", "all", filepath.Join(dir, "theirs.qed")).Run(); !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Errorf("qemu-img check -r all: %v, want exit status 2", err)
	}
	formatstest.SameFiles(t, filepath.Join(dir, "ours.qed"), filepath.Join(dir, "theirs.qed"))

	// A read-write open repairs too (qemu-io opens read-write).
	img, err = formats.Open(filepath.Join(dir, "open.qed"), formats.OpenOptions{Format: "qed"})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	formatstest.QemuIO(t, "qed", filepath.Join(dir, "qopen.qed"), "read 0 512")
	formatstest.SameFiles(t, filepath.Join(dir, "open.qed"), filepath.Join(dir, "qopen.qed"))
}

// TestPartialWriteToZeroCluster: a partial write into a zero cluster of
// an image with a backing file keeps the rest of the cluster zero.
func TestPartialWriteToZeroCluster(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{9}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(dir, "over.qed")
	if err := formatstest.Create(t, "qed", name, "size=1M,cluster_size=4k,backing_file=base.raw,backing_fmt=raw"); err != nil {
		t.Fatal(err)
	}
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "qed"})
	if err := img.(formats.Zeroer).WriteZeroes(8192, 4096, false); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 8192+100); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := img.ReadAt(got, 8192); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4096)
	want[100] = 1
	if !bytes.Equal(got, want) {
		t.Fatalf("cluster reads %v..., want zeroes and the written byte", got[:8])
	}
}

// TestOpenErrors checks the messages for bad headers.
func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qed")
	if err := formatstest.Create(t, "qed", good, "size=1M,cluster_size=4k,table_size=2"); err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		patch func(b []byte) []byte
		msg   string
	}{
		{func(b []byte) []byte { b[17] = 1; return b }, "Unsupported QED features: 100"},
		{func(b []byte) []byte { b[5] = 0x11; return b }, "QED cluster size is invalid"},
		{func(b []byte) []byte { b[8] = 3; return b }, "QED table size is invalid"},
		{func(b []byte) []byte { b[8] = 1; return b }, "QED table offset is invalid"},
		{func(b []byte) []byte { b[48] = 1; return b }, "QED image size is invalid"},
		{func(b []byte) []byte { b[42] = 9; return b }, "QED table offset is invalid"},
		{func(b []byte) []byte { return b[:8192+100] }, "QED table offset is invalid"},
		{func(b []byte) []byte {
			b[16] = 1
			binary.LittleEndian.PutUint32(b[56:], 64)
			binary.LittleEndian.PutUint32(b[60:], 4096)
			return b
		}, "QED backing filename offset is invalid"},
	} {
		name := filepath.Join(dir, "bad.qed")
		if err := os.WriteFile(name, c.patch(bytes.Clone(orig)), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := formats.Open(name, formats.OpenOptions{Format: "qed", ReadOnly: true})
		if err == nil || err.Error() != c.msg {
			t.Errorf("got %v, want %q", err, c.msg)
		}
	}
}

// sameInfo checks that qemu-img info, human and JSON, prints what
// control.Info prints for the image. It stands in for
// formatstest.SameInfoAndMap on images whose map fails: qemu-img then
// prints a partial JSON list, which control.Map does not (yet).
func sameInfo(t *testing.T, name string) {
	t.Helper()
	open := func(filename, format string) (formats.Image, error) {
		return formatstest.OpenRetry(filename, formats.OpenOptions{Format: format, ReadOnly: true, NoIO: true})
	}
	info, err := control.Info(control.InfoOptions{Filename: name, Format: "qed", Open: open})
	if err != nil {
		t.Fatal(err)
	}
	if want, got := formatstest.Exec(t, "qemu-img", "info", "-U", "-f", "qed", "--output=json", name), info.JSON(); got != want {
		t.Errorf("qemu-img info --output=json %s:\n%s\nours:\n%s", filepath.Base(name), want, got)
	}
	if want, got := formatstest.Exec(t, "qemu-img", "info", "-U", "-f", "qed", name), info.Human(); got != want {
		t.Errorf("qemu-img info %s:\n%s\nours:\n%s", filepath.Base(name), want, got)
	}
}

// compareCheck runs qemu-img check (human and JSON) and our check on an
// image and compares stdout, stderr and the exit code.
func compareCheck(t *testing.T, name string) {
	t.Helper()
	img := formatstest.Open(t, name, formats.OpenOptions{Format: "qed", ReadOnly: true, Check: true})
	// Closed on return: the caller repairs the image next.
	defer img.Close()
	for _, asJSON := range []bool{false, true} {
		args := []string{"check", "-U", "-f", "qed", name}
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
}
