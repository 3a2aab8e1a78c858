package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Interop tests of internal snapshots: the same sequence of writes and
// snapshot operations runs on two copies of an image, one where
// qemu-img does every snapshot operation and one where imgfs and
// qemu-img take turns, so that snapshots taken by either tool are
// applied and deleted by the other. After every step both copies must
// read the same, list the same snapshots, check the same, and convert
// -l of every snapshot must give the same bytes through either tool.

// snapStep is one step: a qemu-io command line, a qemu-img resize, or a
// snapshot command.
type snapStep struct {
	qio    string   // qemu-io -c command when set
	resize string   // qemu-img resize size when set
	args   []string // snapshot arguments before the file name
}

var snapSequence = []snapStep{
	{qio: "write -P 0x11 0 192k"},
	{args: []string{"-c", "one"}},
	{qio: "write -P 0x22 64k 64k"},
	{args: []string{"-c", "two"}},
	{qio: "write -P 0x33 128k 320k"},
	{args: []string{"-a", "one"}},
	{qio: "write -P 0x44 1M 4k"},
	{args: []string{"-c", "three"}},
	{args: []string{"-d", "one"}},
	{args: []string{"-a", "2"}},
	{qio: "write -P 0x55 0 4k"},
	{args: []string{"-d", "two"}},
	{resize: "3M"},
	{qio: "write -P 0x66 1984k 64k"},
	{args: []string{"-c", "big"}},
	{args: []string{"-a", "three"}},
	{args: []string{"-d", "three"}},
	{args: []string{"-a", "big"}},
}

type snapVariant struct {
	name  string
	setup [][]string // commands run in the directory; "X" is the image
}

var snapVariants = []snapVariant{
	{"default", [][]string{{"qemu-img", "create", "-q", "-f", "qcow2", "X", "2M"}}},
	{"extended_l2", [][]string{{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "X", "2M"}}},
	{"v2", [][]string{{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "X", "2M"}}},
	{"refcount1", [][]string{{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "X", "2M"}}},
	{"compressed", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "2M"},
		{"qemu-io", "-c", "write -P 0x66 0 512k", "src.qcow2"},
		{"qemu-img", "convert", "-c", "-O", "qcow2", "src.qcow2", "X"},
	}},
	{"backing", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M"},
		{"qemu-io", "-c", "write -P 0x77 0 2M", "base.qcow2"},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "X", "2M"},
	}},
}

func TestSnapshotInteropWithQemu(t *testing.T) {
	variants := snapVariants
	if testing.Short() {
		variants = variants[:1]
	}
	for _, v := range variants {
		for parity := range 2 {
			t.Run(fmt.Sprintf("%s/imgfs-first=%v", v.name, parity == 0), func(t *testing.T) {
				dir := t.TempDir()
				for _, c := range v.setup {
					c = append([]string(nil), c...)
					for k := range c {
						if c[k] == "X" {
							c[k] = "orig.qcow2"
						}
					}
					runIn(t, dir, c...)
				}
				ref := filepath.Join(dir, "ref.qcow2") // qemu-img only
				mix := filepath.Join(dir, "mix.qcow2") // both tools
				copyFile(t, filepath.Join(dir, "orig.qcow2"), ref)
				copyFile(t, filepath.Join(dir, "orig.qcow2"), mix)
				ops := 0
				for i, s := range snapSequence {
					switch {
					case s.qio != "":
						runIn(t, dir, "qemu-io", "-c", s.qio, ref)
						runIn(t, dir, "qemu-io", "-c", s.qio, mix)
					case s.resize != "":
						// v2 images with snapshots cannot be resized.
						if a, b := runQemu(t, "resize", ref, s.resize), runQemu(t, "resize", mix, s.resize); a.code != b.code {
							t.Fatalf("step %d resize: %+v, %+v", i, a, b)
						}
					default:
						args := append([]string{"snapshot"}, s.args...)
						want := runQemu(t, append(args, ref)...)
						var got cmdResult
						if ops%2 == parity {
							got = runImgfs(append(args, mix)...)
						} else {
							got = runQemu(t, append(args, mix)...)
						}
						ops++
						got.stderr = strings.ReplaceAll(got.stderr, mix, ref)
						if want != got {
							t.Fatalf("step %d %v: qemu-img %+v, mixed %+v", i, s.args, want, got)
						}
					}
					compareSnapshotImages(t, fmt.Sprintf("step %d %v%s%s", i, s.args, s.qio, s.resize), ref, mix, s.args != nil)
				}
				if got, want := runImgfs("info", mix), runQemu(t, "info", mix); got != want {
					t.Fatalf("info: qemu-img %+v, imgfs %+v", want, got)
				}
			})
		}
	}
}

// compareSnapshotImages checks that mix is sound and equals ref: same
// check verdict, same content and, after snapshot operations (snaps),
// same snapshot IDs and names, same content of every snapshot, and that
// both tools list, convert and measure mix alike.
func compareSnapshotImages(t *testing.T, step, ref, mix string, snaps bool) {
	t.Helper()
	if a, b := checkVerdict(t, ref), checkVerdict(t, mix); a != b {
		t.Fatalf("%s: qemu-img check: reference %q, mixed %q", step, a, b)
	}
	if r := runQemu(t, "compare", ref, mix); r.code != 0 || r.stdout != "Images are identical.\n" {
		t.Fatalf("%s: compare: %+v", step, r)
	}
	if !snaps {
		return
	}
	refList := runQemu(t, "snapshot", "-l", ref)
	mixList := runQemu(t, "snapshot", "-l", mix)
	if a, b := idsAndNames(refList.stdout), idsAndNames(mixList.stdout); a != b {
		t.Fatalf("%s: snapshots: reference\n%s\nmixed\n%s", step, refList.stdout, mixList.stdout)
	}
	if got := runImgfs("snapshot", "-l", mix); got != mixList {
		t.Fatalf("%s: snapshot -l: qemu-img %+v, imgfs %+v", step, mixList, got)
	}
	dir := filepath.Dir(mix)
	for _, id := range regexp.MustCompile(`(?m)^(\d+) `).FindAllStringSubmatch(mixList.stdout, -1) {
		want := filepath.Join(dir, "want.raw")
		got := filepath.Join(dir, "got.raw")
		if r := runQemu(t, "convert", "-l", id[1], "-O", "raw", mix, want); r.code != 0 {
			t.Fatalf("%s: qemu-img convert -l %s: %+v", step, id[1], r)
		}
		if r := runImgfs("convert", "-l", "snapshot.id="+id[1], "-O", "raw", mix, got); r.code != 0 {
			t.Fatalf("%s: imgfs convert -l %s: %+v", step, id[1], r)
		}
		if !sameFile(t, want, got) {
			t.Fatalf("%s: snapshot %s reads differently", step, id[1])
		}
		if w, g := runQemu(t, "measure", "-l", id[1], mix), runImgfs("measure", "-l", id[1], mix); w != g {
			t.Fatalf("%s: measure -l %s: qemu-img %+v, imgfs %+v", step, id[1], w, g)
		}
	}
}

// checkVerdict is qemu-img check's exit code and its report without
// the lines that depend on where clusters were placed.
func checkVerdict(t *testing.T, file string) string {
	r := runQemu(t, "check", file)
	var keep []string
	for _, l := range strings.Split(r.stdout+r.stderr, "\n") {
		if regexp.MustCompile(`^\d+/\d+ = |^Image end offset`).MatchString(l) {
			continue
		}
		keep = append(keep, strings.ReplaceAll(l, file, "FILE"))
	}
	return fmt.Sprintf("%d %s", r.code, strings.Join(keep, "\n"))
}

// idsAndNames keeps the ID and TAG columns of a snapshot list.
func idsAndNames(list string) string {
	var b strings.Builder
	for _, l := range strings.Split(list, "\n") {
		if f := strings.Fields(l); len(f) >= 2 {
			b.WriteString(f[0] + " " + f[1] + "\n")
		}
	}
	return b.String()
}

func runIn(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	da, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(da, db)
}

func TestSnapshotMessagesMatchQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "q.qcow2", "1M"),
		qimg("snapshot", "-c", "s1", "q.qcow2"),
		qimg("snapshot", "-c", "s1", "q.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "empty.qcow2", "1M"),
		qimg("create", "-q", "-f", "raw", "r.img", "1M"),
		qimg("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "df.qcow2", "1M"),
	})
	for _, args := range [][]string{
		{"snapshot", "-l", "q.qcow2"},
		{"snapshot", "-U", "-l", "q.qcow2"},
		{"snapshot", "-q", "-l", "q.qcow2"},
		{"snapshot", "--image-opts", "-l", "driver=qcow2,file.filename=q.qcow2"},
		{"snapshot", "-l", "empty.qcow2"},
		{"snapshot", "-l", "r.img"},
		{"snapshot", "q.qcow2"},
		{"snapshot", "-l", "-c", "x", "q.qcow2"},
		{"snapshot", "-c", "x", "-c", "y", "q.qcow2"},
		{"snapshot", "-l", "-l", "q.qcow2"},
		{"snapshot", "-a", "x", "-d", "y", "q.qcow2"},
		{"snapshot", "-a"},
		{"snapshot", "-f", "qcow2", "-l", "q.qcow2"},
		{"snapshot", "-l"},
		{"snapshot", "-l", "q.qcow2", "empty.qcow2"},
		{"snapshot", "-l", "missing.qcow2"},
		{"snapshot", "-a", "nope", "q.qcow2"},
		{"snapshot", "-d", "nope", "q.qcow2"},
		{"snapshot", "-d", "1", "q.qcow2"},
		{"snapshot", "-U", "-c", "x", "q.qcow2"},
		{"snapshot", "-c", "x", "r.img"},
		{"snapshot", "-a", "x", "r.img"},
		{"snapshot", "-d", "x", "r.img"},
		{"snapshot", "-c", "x", "df.qcow2"},
		{"snapshot", "-l", "df.qcow2"},
		{"snapshot", "-a", "x", "df.qcow2"},
		{"snapshot", "-d", "x", "df.qcow2"},
		{"convert", "-l", "nope", "-O", "raw", "q.qcow2", "o.raw"},
		{"convert", "-l", "snapshot.id=9", "-O", "raw", "q.qcow2", "o.raw"},
		{"convert", "-l", "snapshot.foo=1", "-O", "raw", "q.qcow2", "o.raw"},
		{"convert", "-l", "s1", "-O", "raw", "r.img", "o.raw"},
		{"convert", "-l", "1", "-O", "raw", "q.qcow2", "empty.qcow2", "o.raw"},
		{"measure", "-l", "nope", "q.qcow2"},
		{"measure", "-l", "snapshot.id=2,snapshot.name=s1", "q.qcow2"},
		{"measure", "-l", "snapshot.id=1,snapshot.name=zz", "q.qcow2"},
		{"measure", "-l", "s1", "-f", "raw", "r.img"},
	} {
		sameAsQemu(t, args...)
	}
}
