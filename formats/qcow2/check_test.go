package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// The differential tests build damaged images with qemu-img and qemu-io,
// poke bytes into them, and require that our check reports what
// `qemu-img check` reports on an identical copy: the same counters, the
// same per-problem messages, the same exit code, and after a repair an
// image that QEMU finds as QEMU's own repair left it.

func needQemu(t *testing.T) {
	t.Helper()
	for _, p := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("%s not installed: run `make test`, which installs it", p)
		}
	}
}

func run(t *testing.T, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	return runIn(t, "", name, args...)
}

// runIn runs a command in directory dir: QEMU 7.2 opens a relative
// external data file name relative to the working directory.
func runIn(t *testing.T, dir, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("%s %v: %v", name, args, err)
	}
	return o.String(), e.String(), code
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	mustRunIn(t, "", name, args...)
}

func mustRunIn(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	if _, stderr, code := runIn(t, dir, name, args...); code != 0 {
		t.Fatalf("%s %v: exit %d: %s", name, args, code, stderr)
	}
}

// image is a test image being built: its path and raw access to its
// metadata for poking.
type image struct {
	t    *testing.T
	path string
}

func newImage(t *testing.T, opts, size string) *image {
	t.Helper()
	path := filepath.Join(t.TempDir(), "t.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	mustRun(t, "qemu-img", append(args, path, size)...)
	return &image{t: t, path: path}
}

// io runs qemu-io commands on the image.
func (m *image) io(cmds ...string) *image {
	m.t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	mustRun(m.t, "qemu-io", append(args, m.path)...)
	return m
}

func (m *image) header() (*Header, Layout) {
	m.t.Helper()
	f, err := os.Open(m.path)
	if err != nil {
		m.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<21)
	n, _ := f.ReadAt(buf, 0)
	h, err := DecodeHeader(buf[:n])
	if err != nil {
		m.t.Fatal(err)
	}
	if err := h.DecodeExtensions(buf[:min(n, int(h.ClusterSize()))]); err != nil {
		m.t.Fatal(err)
	}
	return h, NewLayout(h)
}

func (m *image) read(off uint64, n int) []byte {
	m.t.Helper()
	f, err := os.Open(m.path)
	if err != nil {
		m.t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, int64(off)); err != nil {
		m.t.Fatal(err)
	}
	return b
}

func (m *image) write(off uint64, b []byte) {
	m.t.Helper()
	f, err := os.OpenFile(m.path, os.O_RDWR, 0)
	if err != nil {
		m.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, int64(off)); err != nil {
		m.t.Fatal(err)
	}
}

func (m *image) u64(off uint64) uint64 { return binary.BigEndian.Uint64(m.read(off, 8)) }

func (m *image) putU64(off, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	m.write(off, b[:])
}

// l2EntryOff is the file offset of the L2 entry mapping a guest offset in
// the active L1 table.
func (m *image) l2EntryOff(guest int64) uint64 {
	m.t.Helper()
	h, l := m.header()
	l2 := m.u64(h.L1TableOffset+uint64(l.L1Index(guest))*8) & OffsetMask
	if l2 == 0 {
		m.t.Fatalf("no L2 table for guest offset %#x", guest)
	}
	return l2 + uint64(l.L2Index(guest)*l.L2EntrySize)
}

func (m *image) l2Entry(guest int64) uint64 { return m.u64(m.l2EntryOff(guest)) }

func (m *image) setL2Entry(guest int64, v uint64) { m.putU64(m.l2EntryOff(guest), v) }

// refcountLoc is the refcount block holding a host cluster's refcount.
func (m *image) refcountLoc(cluster int64) (block []byte, blockOff uint64, idx int64, order uint32) {
	m.t.Helper()
	h, l := m.header()
	rt := m.u64(h.RefcountTableOffset+uint64(cluster>>l.RefblockBits)*8) & reftOffsetMask
	if rt == 0 {
		m.t.Fatalf("no refcount block for cluster %d", cluster)
	}
	return m.read(rt, int(l.ClusterSize)), rt, cluster & (l.RefblockEntries - 1), l.RefcountOrder
}

func (m *image) refcount(cluster int64) uint64 {
	b, _, i, o := m.refcountLoc(cluster)
	return GetRefcount(b, i, o)
}

func (m *image) setRefcount(cluster int64, v uint64) {
	b, off, i, o := m.refcountLoc(cluster)
	SetRefcount(b, i, o, v)
	m.write(off, b)
}

func (m *image) copy(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(m.path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "copy.qcow2")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	// An external data file keeps its name next to the copy.
	if d, err := os.ReadFile(m.path + ".data"); err == nil {
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(m.path)+".data"), d, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// checkOutcome is what `qemu-img check --output=json` shows: the JSON
// counters, the stderr lines, and the exit code.
type checkOutcome struct {
	Counters map[string]int64
	Messages []string
	Code     int
}

var modeFlag = map[formats.CheckMode]string{
	formats.CheckReadOnly: "",
	formats.CheckFixLeaks: "leaks",
	formats.CheckFixAll:   "all",
}

func qemuCheck(t *testing.T, path string, mode formats.CheckMode) checkOutcome {
	t.Helper()
	args := []string{"check", "-f", "qcow2", "--output=json"}
	if f := modeFlag[mode]; f != "" {
		args = append(args, "-r", f)
	}
	stdout, stderr, code := runIn(t, filepath.Dir(path), "qemu-img", append(args, filepath.Base(path))...)
	out := checkOutcome{Code: code, Counters: map[string]int64{}}
	if stdout != "" {
		var m map[string]any
		if err := json.Unmarshal([]byte(stdout), &m); err != nil {
			t.Fatalf("qemu-img check output %q: %v", stdout, err)
		}
		for k, v := range m {
			if f, ok := v.(float64); ok {
				out.Counters[k] = int64(f)
			}
		}
	}
	for _, line := range strings.Split(strings.TrimSuffix(stderr, "\n"), "\n") {
		if line != "" {
			out.Messages = append(out.Messages, strings.TrimPrefix(line, "qemu-img: "))
		}
	}
	return out
}

// ourCheck runs our check through control.Check, which drives it as
// qemu-img's img_check does (a second read-only pass after repairs).
func ourCheck(t *testing.T, path string, mode formats.CheckMode) checkOutcome {
	t.Helper()
	ro := mode == formats.CheckReadOnly
	f, err := formats.OpenFile(path, ro, false)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	report := func(s string) { msgs = append(msgs, s) }
	img, err := open(f, &formats.OpenOptions{Format: "qcow2", ReadOnly: ro, NoBacking: true, Warn: report})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	rep, err := control.Check(context.Background(), control.CheckOptions{Image: img, Filename: path, Mode: mode, Report: report})
	out := checkOutcome{Counters: map[string]int64{}, Messages: msgs}
	if err != nil {
		out.Messages = append(msgs, "Check failed: "+err.Error())
		out.Code = 1
		return out
	}
	for _, m := range rep.Object() {
		if v, ok := m.Value.(int64); ok {
			out.Counters[m.Key] = v
		}
	}
	out.Code = rep.ExitCode()
	if rep.CheckErrors != 0 {
		out.Messages = append(out.Messages, "Check failed")
	}
	return out
}

func diffOutcome(t *testing.T, what string, want, got checkOutcome) {
	t.Helper()
	if !reflect.DeepEqual(want.Counters, got.Counters) {
		t.Errorf("%s: counters\nqemu: %v\nours: %v", what, want.Counters, got.Counters)
	}
	if strings.Join(want.Messages, "\n") != strings.Join(got.Messages, "\n") {
		t.Errorf("%s: messages\nqemu:\n%s\nours:\n%s", what, strings.Join(want.Messages, "\n"), strings.Join(got.Messages, "\n"))
	}
	if want.Code != got.Code {
		t.Errorf("%s: exit code qemu %d, ours %d", what, want.Code, got.Code)
	}
}

// checkCase is a damaged (or healthy) image recipe.
type checkCase struct {
	name  string
	build func(t *testing.T) *image
	// driverRewrites: QEMU's read-write open and close change the image
	// beyond the check (persistent bitmaps are marked in use and stored
	// again), so only the check output and a clean result are compared.
	driverRewrites bool
}

func checkCases() []checkCase {
	return []checkCase{
		{name: "clean-64k", build: func(t *testing.T) *image {
			return newImage(t, "", "10M").io("write -P 0x11 0 200k", "write -P 0x22 5M 64k")
		}},
		{name: "leak-and-missing-refcount", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			m.setRefcount(0, 2)
			h, _ := m.header()
			m.setRefcount(int64(m.l2Entry(0)&OffsetMask)>>h.ClusterBits, 0)
			return m
		}},
		{name: "leaked-free-cluster", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 256k", "discard 64k 128k")
			m.setRefcount(6, 1)
			return m
		}},
		{name: "refcount-too-high", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.setRefcount(int64(m.l2Entry(64<<10)&OffsetMask)>>h.ClusterBits, 3)
			return m
		}},
		{name: "copied-flag-missing", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			m.setL2Entry(0, m.l2Entry(0)&^OflagCopied)
			return m
		}},
		{name: "l2-past-end", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 64k")
			m.setL2Entry(64<<10, OflagCopied|100<<20)
			return m
		}},
		{name: "shared-cluster", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 64k", "write -P 0x22 1M 64k")
			m.setL2Entry(1<<20, m.l2Entry(0))
			return m
		}},
		{name: "unaligned-zero-alloc", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			m.setL2Entry(64<<10, (m.l2Entry(64<<10)|OflagZero)+0x200)
			return m
		}},
		{name: "unaligned-data", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			m.setL2Entry(64<<10, m.l2Entry(64<<10)+0x200)
			return m
		}},
		{name: "reftable-reserved-bits", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset, m.u64(h.RefcountTableOffset)|0x100)
			return m
		}},
		{name: "refblock-unaligned", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset, m.u64(h.RefcountTableOffset)+0x200)
			return m
		}},
		{name: "refblock-unaligned-beyond-file", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset+8, 0x100200)
			return m
		}},
		{name: "refblock-unaligned-rebuilt", build: func(t *testing.T) *image {
			// The rebuild succeeds, but the corruption event stopped
			// the image: the second pass fails with ENOMEDIUM.
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset, 0x50200)
			return m
		}},
		{name: "refblock-outside-image", build: func(t *testing.T) *image {
			m := newImage(t, "cluster_size=4k", "10M").io("write -P 0x11 0 16k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset+8, 1<<20)
			return m
		}},
		{name: "l1-reserved-bits", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 64k")
			h, _ := m.header()
			m.putU64(h.L1TableOffset, m.u64(h.L1TableOffset)|0x2)
			return m
		}},
		{name: "cluster-512-refcount-1", build: func(t *testing.T) *image {
			m := newImage(t, "cluster_size=512,refcount_bits=1", "1M").io("write -P 0x11 0 8k", "write -P 0x12 300k 1k")
			m.setRefcount(3, 0)
			return m
		}},
		{name: "refcount-64-leak", build: func(t *testing.T) *image {
			m := newImage(t, "refcount_bits=64", "10M").io("write -P 0x11 0 128k")
			m.setRefcount(0, 7)
			return m
		}},
		{name: "refcount-1-overflow", build: func(t *testing.T) *image {
			m := newImage(t, "refcount_bits=1", "10M").io("write -P 0x11 0 64k", "write -P 0x22 1M 64k")
			m.setL2Entry(1<<20, m.l2Entry(0))
			return m
		}},
		{name: "v2-leak", build: func(t *testing.T) *image {
			m := newImage(t, "compat=0.10", "10M").io("write -P 0x11 0 128k")
			m.setRefcount(1, 2)
			return m
		}},
		{name: "compressed-and-zero", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -c -P 0x11 0 64k", "write -c -P 0x12 64k 64k", "write -z 256k 128k", "write -P 0x13 1M 64k")
			m.setRefcount(0, 2)
			return m
		}},
		{name: "compressed-copied-flag", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -c -P 0x11 0 64k")
			m.setL2Entry(0, m.l2Entry(0)|OflagCopied)
			return m
		}},
		{name: "extended-l2", build: func(t *testing.T) *image {
			m := newImage(t, "extended_l2=on,cluster_size=64k", "10M").io("write -P 0x11 0 4k", "write -P 0x12 128k 64k", "write -z 512k 8k")
			m.setRefcount(0, 2)
			return m
		}},
		{name: "extended-l2-bad-bitmap", build: func(t *testing.T) *image {
			m := newImage(t, "extended_l2=on", "10M").io("write -P 0x11 0 4k", "write -P 0x12 128k 4k")
			off := m.l2EntryOff(128 << 10)
			m.putU64(off+8, m.u64(off+8)|1<<32)
			m.putU64(m.l2EntryOff(1<<20)+8, 3)
			return m
		}},
		{name: "snapshots", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			m.io("write -P 0x22 0 64k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s2", m.path)
			m.io("write -P 0x33 64k 64k")
			m.setRefcount(0, 2)
			return m
		}},
		{name: "snapshot-refcount-wrong", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			h, _ := m.header()
			// The data cluster is shared with the snapshot: refcount 2.
			m.setRefcount(int64(m.l2Entry(0)&OffsetMask)>>h.ClusterBits, 1)
			return m
		}},
		{name: "snapshot-entry-incomplete", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 64k")
			mustRun(t, "qemu-img", "snapshot", "-c", "snap1", m.path)
			h, _ := m.header()
			// extra_data_size 24 -> 8: the entry lacks the disk size.
			m.write(h.SnapshotsOffset+36, []byte{0, 0, 0, 8})
			return m
		}},
		{name: "reftable-entry-huge", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.RefcountTableOffset, m.u64(h.RefcountTableOffset)|1<<63)
			return m
		}},
		{name: "l1-entry-far", build: func(t *testing.T) *image {
			m := newImage(t, "cluster_size=4k", "10M").io("write -P 0x11 0 4k")
			h, _ := m.header()
			m.putU64(h.L1TableOffset+8, 0x00f0000000000000)
			return m
		}},
		{name: "l2-is-reftable", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			h, _ := m.header()
			m.putU64(h.L1TableOffset+8, OflagCopied|h.RefcountTableOffset)
			return m
		}},
		{name: "l2-reserved-bits", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			m.setL2Entry(0, m.l2Entry(0)|0x2)
			return m
		}},
		{name: "compressed-past-end", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -c -P 0x11 0 64k")
			m.setL2Entry(64<<10, OflagCompressed|3<<54|50<<20)
			return m
		}},
		{name: "snapshot-l1-unaligned", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			h, _ := m.header()
			m.putU64(h.SnapshotsOffset, m.u64(h.SnapshotsOffset)+0x200)
			return m
		}},
		{name: "snapshot-l1-too-large", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			h, _ := m.header()
			m.write(h.SnapshotsOffset+8, []byte{0x01, 0, 0, 0})
			return m
		}},
		{name: "shared-l2-unaligned-zero", build: func(t *testing.T) *image {
			// The snapshot shares the L2 table: zeroing the entry
			// through the snapshot's table is a write on an active L2
			// table, which the overlap check refuses.
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			m.setL2Entry(64<<10, (m.l2Entry(64<<10)|OflagZero)+0x200)
			return m
		}},
		{name: "external-data-file", build: func(t *testing.T) *image {
			dir := t.TempDir()
			mustRunIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.qcow2.data", "t.qcow2", "10M")
			mustRunIn(t, dir, "qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -P 0x12 1M 64k", "t.qcow2")
			m := &image{t: t, path: filepath.Join(dir, "t.qcow2")}
			m.setRefcount(0, 2)
			m.setL2Entry(64<<10, m.l2Entry(64<<10)&^OflagCopied)
			return m
		}},
		{name: "bitmaps", build: func(t *testing.T) *image {
			m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
			mustRun(t, "qemu-img", "bitmap", "--add", m.path, "b1")
			mustRun(t, "qemu-img", "bitmap", "--add", "-g", "512", m.path, "b2")
			m.io("write -P 0x22 1M 64k")
			m.setRefcount(0, 2)
			return m
		}, driverRewrites: true},
	}
}

func TestCheckMatchesQemu(t *testing.T) {
	needQemu(t)
	for _, tc := range checkCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			base := tc.build(t)
			for _, mode := range []formats.CheckMode{formats.CheckReadOnly, formats.CheckFixLeaks, formats.CheckFixAll} {
				theirs, ours := base.copy(t), base.copy(t)
				what := "check"
				if f := modeFlag[mode]; f != "" {
					what += " -r " + f
				}
				want := qemuCheck(t, theirs, mode)
				got := ourCheck(t, ours, mode)
				delete(want.Counters, "filename")
				diffOutcome(t, what, want, got)
				if mode == formats.CheckReadOnly {
					continue
				}
				after := qemuCheck(t, ours, formats.CheckReadOnly)
				if tc.driverRewrites {
					if after.Code != 0 {
						t.Errorf("%s: qemu-img check after our repair: %+v", what, after)
					}
					continue
				}
				// The repaired images: QEMU sees ours as it sees its own.
				diffOutcome(t, what+" then qemu-img check", qemuCheck(t, theirs, formats.CheckReadOnly), after)
				dataA, errA := os.ReadFile(filepath.Join(filepath.Dir(theirs), "t.qcow2.data"))
				dataB, errB := os.ReadFile(filepath.Join(filepath.Dir(ours), "t.qcow2.data"))
				switch {
				case errA == nil || errB == nil:
					// QEMU finds a relative data file name from its
					// working directory, so compare the data files.
					if !bytes.Equal(dataA, dataB) {
						t.Errorf("%s: data file differs from QEMU's repair", what)
					}
				case after.Code != 2:
					// (Images left corrupt cannot be read by QEMU.)
					if _, stderr, code := run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", theirs, ours); code != 0 {
						t.Errorf("%s: guest content differs from QEMU's repair: %s", what, stderr)
					}
				}
				a, _ := os.ReadFile(theirs)
				b, _ := os.ReadFile(ours)
				if i := firstDiff(a, b); i >= 0 {
					t.Errorf("%s: repaired file differs from QEMU's repair at byte %#x (%d vs %d bytes)", what, i, len(a), len(b))
				}
			}
		})
	}
}

// TestRepairDirty: a lazy-refcounts image left dirty is repaired by the
// read-write open as QEMU's open repairs it: same messages, and the same
// bytes on disk afterwards.
func TestRepairDirty(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name, opts string
		snapshot   bool
	}{
		{"64k", "lazy_refcounts=on", false},
		{"512-refcount-1", "lazy_refcounts=on,cluster_size=512,refcount_bits=1", false},
		{"extended-l2", "lazy_refcounts=on,extended_l2=on", false},
		{"snapshot", "lazy_refcounts=on,refcount_bits=64", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newImage(t, tc.opts, "10M")
			if tc.snapshot {
				m.io("write -P 0x21 0 64k")
				mustRun(t, "qemu-img", "snapshot", "-c", "s1", m.path)
			}
			// qemu-io's abort leaves the image dirty with refcounts not
			// written.
			run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 200k", "-c", "write -P 0x23 1M 64k", "-c", "abort", m.path)
			if h, _ := m.header(); h.IncompatibleFeatures&IncompatDirty == 0 {
				t.Fatal("image is not dirty after qemu-io abort")
			}
			diffOutcome(t, "check of dirty image", qemuCheck(t, m.copy(t), formats.CheckReadOnly), ourCheck(t, m.copy(t), formats.CheckReadOnly))

			theirs, ours := m.copy(t), m.copy(t)
			_, qemuMsgs, _ := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0x22 0 200k", theirs)
			var msgs []string
			img, err := formats.Open(ours, formats.OpenOptions{Format: "qcow2", Warn: func(s string) { msgs = append(msgs, s) }})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(msgs, "\n") + "\n"; got != qemuMsgs {
				t.Errorf("repair messages\nqemu:\n%sours:\n%s", qemuMsgs, got)
			}
			diffOutcome(t, "check after repair", qemuCheck(t, theirs, formats.CheckReadOnly), qemuCheck(t, ours, formats.CheckReadOnly))
			if h, _ := (&image{t: t, path: ours}).header(); h.IncompatibleFeatures&IncompatDirty != 0 {
				t.Error("dirty bit still set after repair")
			}
			if _, stderr, code := run(t, "qemu-img", "compare", theirs, ours); code != 0 {
				t.Errorf("content differs after repair: %s", stderr)
			}
			a, _ := os.ReadFile(theirs)
			b, _ := os.ReadFile(ours)
			if i := firstDiff(a, b); i >= 0 {
				t.Errorf("repaired file differs from QEMU's repair at byte %#x (%d vs %d bytes)", i, len(a), len(b))
			}
		})
	}
}

// firstDiff is the offset of the first byte where a and b differ, -1
// when they are equal.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestRefcountArray(t *testing.T) {
	for _, order := range []uint32{0, 1, 2, 3, 4, 5, 6} {
		a := &refcountArray{order: order, clusterSize: 512}
		if err := a.resize(5000); err != nil {
			t.Fatal(err)
		}
		if int64(len(a.buf))%512 != 0 || int64(len(a.buf))*8 < 5000<<order {
			t.Errorf("order %d: buffer of %d bytes for 5000 entries", order, len(a.buf))
		}
		max := MaxRefcount(order)
		a.set(4999, max)
		a.set(17, 1)
		if err := a.resize(9000); err != nil {
			t.Fatal(err)
		}
		if a.get(4999) != max || a.get(17) != 1 || a.get(8999) != 0 || a.get(16) != 0 {
			t.Errorf("order %d: values lost across resize", order)
		}
	}
	a := &refcountArray{order: 6, clusterSize: 512}
	if err := a.resize(1 << 40); !errors.Is(err, syscall.ENOMEM) {
		t.Errorf("absurd refcount array: err = %v", err)
	}
}

func TestHexAlt(t *testing.T) {
	for v, want := range map[uint64]string{0: "0", 1: "0x1", 0x20100: "0x20100"} {
		if got := hexAlt(v); got != want {
			t.Errorf("hexAlt(%d) = %q, want %q", v, got, want)
		}
	}
}

// TestCheckHostileSize: sparse files whose refcounts would not fit in
// memory are refused with an error instead of an allocation. Past
// INT_MAX clusters QEMU refuses too, with the same message.
func TestCheckHostileSize(t *testing.T) {
	needQemu(t)
	m := newImage(t, "cluster_size=512,refcount_bits=64", "1M")
	if err := os.Truncate(m.path, 1<<40); err != nil {
		t.Fatal("cannot make a sparse 1 TiB file here:", err)
	}
	diffOutcome(t, "1 TiB of 512-byte clusters", qemuCheck(t, m.path, formats.CheckReadOnly), ourCheck(t, m.path, formats.CheckReadOnly))

	// 2^28 clusters of 64-bit refcounts: 2 GiB, beyond imgfs' bound.
	if err := os.Truncate(m.path, 1<<37); err != nil {
		t.Fatal(err)
	}
	f, err := formats.OpenFile(m.path, true, false)
	if err != nil {
		t.Fatal(err)
	}
	img, err := open(f, &formats.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.(*Image).Check(context.Background(), formats.CheckReadOnly, nil); !errors.Is(err, syscall.ENOMEM) {
		t.Errorf("check of a 128 GiB sparse file with 512-byte clusters: err = %v, want ENOMEM", err)
	}
}

// TestCheckModes: repairs need a writable image; a cancelled context
// stops the check.
func TestCheckModes(t *testing.T) {
	needQemu(t)
	m := newImage(t, "", "10M").io("write -P 0x11 0 128k")
	for _, ro := range []bool{true, false} {
		f, err := formats.OpenFile(m.path, ro, false)
		if err != nil {
			t.Fatal(err)
		}
		fimg, err := open(f, &formats.OpenOptions{ReadOnly: ro})
		if err != nil {
			t.Fatal(err)
		}
		img := fimg.(*Image)
		_, err = img.Check(context.Background(), formats.CheckFixAll, nil)
		if ro != errors.Is(err, formats.ErrReadOnly) {
			t.Errorf("read-only %v: -r all: err = %v", ro, err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := img.Check(ctx, formats.CheckReadOnly, nil); !errors.Is(err, context.Canceled) {
			t.Errorf("read-only %v: cancelled check: err = %v", ro, err)
		}
		res, err := img.Check(context.Background(), formats.CheckReadOnly, nil)
		if err != nil || *res != (formats.CheckResult{ImageEndOffset: 7 << 16, TotalClusters: 160, AllocatedClusters: 2}) {
			t.Errorf("read-only %v: check = %+v, %v", ro, res, err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzCheck pokes bytes into a small image with snapshots, compressed
// clusters and a bitmap, and runs every check mode: whatever the image
// holds, the check must neither panic nor allocate without bound.
func FuzzCheck(f *testing.F) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		f.Skip("qemu-img not installed")
	}
	dir := f.TempDir()
	path := filepath.Join(dir, "seed.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "256k"},
		{"qemu-io", "-c", "write -P 0x11 0 3k", "-c", "write -c -P 0x12 64k 2k", "-c", "write -z 128k 1k", path},
		{"qemu-img", "snapshot", "-c", "s1", path},
		{"qemu-io", "-c", "write -P 0x13 1k 1k", path},
		{"qemu-img", "bitmap", "--add", path, "b1"},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			f.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	seed, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(uint16(0x10), uint64(0x0123456789abcdef))
	f.Add(uint16(0x200), uint64(0x8000000000001000))
	f.Add(uint16(0x400), uint64(1))
	// Repairs may grow the file to hold a refcount block far out, as
	// QEMU does; keep what the check may then allocate small.
	defer func(n int64) { maxRefcountArrayBytes = n }(maxRefcountArrayBytes)
	maxRefcountArrayBytes = 1 << 20
	f.Fuzz(func(t *testing.T, where uint16, v uint64) {
		img := append([]byte(nil), seed...)
		// Poke at metadata: the first 8 KiB hold the header, tables
		// and refcounts of this small image.
		off := int(where) % (min(len(img), 8192) - 8)
		binary.BigEndian.PutUint64(img[off:], v)
		for _, mode := range []formats.CheckMode{formats.CheckReadOnly, formats.CheckFixLeaks, formats.CheckFixAll} {
			p := filepath.Join(t.TempDir(), "f.qcow2")
			if err := os.WriteFile(p, img, 0o644); err != nil {
				t.Fatal(err)
			}
			file, err := formats.OpenFile(p, mode == formats.CheckReadOnly, false)
			if err != nil {
				t.Fatal(err)
			}
			fimg, err := open(file, &formats.OpenOptions{ReadOnly: mode == formats.CheckReadOnly, NoBacking: true})
			if err != nil {
				continue
			}
			fimg.(*Image).Check(context.Background(), mode, func(string) {})
			fimg.Close()
		}
	})
}

func TestMetadataOverlap(t *testing.T) {
	h := &Header{L1TableOffset: 0x30000, RefcountTableOffset: 0x10000, SnapshotsOffset: 0x90000,
		Bitmaps: &BitmapsExt{DirectoryOff: 0xa0000, DirectorySize: 40}}
	refs := metadataRefs{
		hdr: h, clusterSize: 0x10000,
		l1:            []uint64{OflagCopied | 0x40000, 0},
		reftable:      []uint64{0x20000, 0},
		snapshots:     []SnapshotEntry{{L1TableOffset: 0x80000, L1Size: 2}},
		snapshotsSize: 100,
	}
	for _, tc := range []struct {
		ign       int
		off, size uint64
		want      int
	}{
		{0, 0x200, 8, olMainHeader},
		{0, 0x10008, 8, olRefcountTable},
		{0, 0x2fff0, 0x20, olActiveL1}, // widened to whole clusters
		{0, 0x20010, 8, olRefcountBlock},
		{0, 0x30000, 8, olActiveL1},
		{olActiveL1, 0x30000, 8, 0},
		{0, 0x48000, 8, olActiveL2},
		{olActiveL2, 0x48000, 8, 0},
		{0, 0x50000, 0x20000, 0},
		{0, 0x80000, 8, olInactiveL1},
		{0, 0x90010, 8, olSnapshotTable},
		{0, 0xa0000, 0x10000, olBitmapDirectory},
		{0, 0xb0000, 0, 0},
	} {
		if got := refs.overlap(tc.ign, tc.off, tc.size); got != tc.want {
			t.Errorf("overlap(%#x, %#x, %#x) = %#x, want %#x", tc.ign, tc.off, tc.size, got, tc.want)
		}
	}
	if got := overlapName(olRefcountBlock); got != "refcount block" {
		t.Errorf("overlapName(olRefcountBlock) = %q", got)
	}
}
