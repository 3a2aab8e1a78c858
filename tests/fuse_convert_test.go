package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// convertPresets are the files of convert-to/ and the qemu-img format
// of each.
var convertPresets = []struct{ name, format string }{
	{"disk.compressed.qcow2", "qcow2"},
	{"disk.fixed.vhd", "vpc"},
	{"disk.qcow2", "qcow2"},
	{"disk.raw", "raw"},
	{"disk.stream.vmdk", "vmdk"},
	{"disk.vdi", "vdi"},
	{"disk.vhd", "vpc"},
	{"disk.vhdx", "vhdx"},
	{"disk.vmdk", "vmdk"},
}

// checkConvertTarget copies one convert-to file out with cp and has
// qemu-img check and compare the copy against the source; files small
// enough are also read twice to see the same bytes.
func checkConvertTarget(t *testing.T, mnt, out, image, srcFormat, preset, format string) {
	t.Helper()
	file := filepath.Join(mnt, image, "convert-to", preset)
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(out, image+"."+preset)
	start := time.Now()
	if r := run(t, "", "cp", file, dst); r.code != 0 {
		t.Fatalf("cp %s: %s", file, r.stderr)
	}
	t.Logf("cp %s/%s: %d bytes in %v", image, preset, st.Size(), time.Since(start))
	got, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if got.Size() != st.Size() {
		t.Errorf("%s/%s: st_size %d, cp copied %d bytes", image, preset, st.Size(), got.Size())
	}
	if st.Size() <= 64<<20 {
		first, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		second, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		copied, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(first, second) || !bytes.Equal(first, copied) {
			t.Errorf("%s/%s: reads differ", image, preset)
		}
	}
	if format != "raw" && format != "vpc" { // qemu-img cannot check these
		if r := run(t, "", qemuImg, "check", "-f", format, dst); r.code != 0 || !strings.Contains(r.stdout, "No errors were found") {
			t.Errorf("qemu-img check %s/%s: exit %d\n%s%s", image, preset, r.code, r.stdout, r.stderr)
		}
	}
	src := filepath.Join(filepath.Dir(out), "src", image)
	if r := run(t, "", qemuImg, "compare", "-f", srcFormat, "-F", format, src, dst); r.code != 0 || !strings.Contains(r.stdout, "Images are identical.") {
		t.Errorf("qemu-img compare %s %s: exit %d\n%s%s", image, preset, r.code, r.stdout, r.stderr)
	}
	if err := os.Remove(dst); err != nil {
		t.Fatal(err)
	}
}

func TestFUSEConvertTo(t *testing.T) {
	requireFUSE(t)
	top := t.TempDir()
	src, out := filepath.Join(top, "src"), filepath.Join(top, "out")
	for _, d := range []string{src, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	runSteps(t, src, []step{
		// Scattered data, an explicit zero range and a size that is no
		// multiple of any cluster.
		create("a.qcow2", "5000k", ""),
		qemuIO("qcow2", "a.qcow2", "write -P 0xab 0 100k", "write -P 0x11 2047k 3k",
			"write -z 3M 512k", "write -P 0x22 4999k 1k"),
		// An overlay: the target holds the whole chain's data.
		overlay("c.qcow2", "a.qcow2", "qcow2", ""),
		qemuIO("qcow2", "c.qcow2", "write -P 0x33 64k 8k", "write -z 2047k 1k"),
		createRaw("b.img", "3M"),
		qemuIO("raw", "b.img", "write -P 0x42 4k 12k", "write -P 0x43 2M 1M"),
		// Data that does not compress, for disk.compressed.qcow2.
		randomData("b.img", 1<<20, 200<<10),
		// Large and nearly empty: neither cp nor the layout may read it
		// all or copy it whole.
		create("big.qcow2", "4G", ""),
		qemuIO("qcow2", "big.qcow2", "write -P 0x5 1G 1M", "write -P 7 4095M 64k"),
	})
	mnt := mountImgfs(t, src)

	var want []string
	for _, p := range convertPresets {
		want = append(want, p.name)
	}
	if got := readDirNames(t, filepath.Join(mnt, "a.qcow2", "convert-to")); !slices.Equal(got, want) {
		t.Fatalf("convert-to lists %q, want %q", got, want)
	}
	for _, img := range []struct{ name, format string }{
		{"a.qcow2", "qcow2"}, {"c.qcow2", "qcow2"}, {"b.img", "raw"}, {"big.qcow2", "qcow2"},
	} {
		for _, p := range convertPresets {
			t.Run(img.name+"/"+p.name, func(t *testing.T) {
				checkConvertTarget(t, mnt, out, img.name, img.format, p.name, p.format)
			})
		}
	}

	// A change to the source, through the mount, changes the targets.
	// (a.qcow2 backs c.qcow2, so the mount keeps it read-only.)
	before, err := os.Stat(filepath.Join(mnt, "c.qcow2", "convert-to", "disk.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(mnt, "c.qcow2", "disk"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x77}, 64<<10), 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(filepath.Join(mnt, "c.qcow2", "convert-to", "disk.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if after.Size() <= before.Size() {
		t.Errorf("disk.qcow2 is %d bytes after a write to a new cluster, was %d", after.Size(), before.Size())
	}
	for _, p := range convertPresets {
		checkConvertTarget(t, mnt, out, "c.qcow2", "qcow2", p.name, p.format)
	}
}

// readTarget reads a convert-to file, checks that its st_size before
// the read was the number of bytes read, and returns them.
func readTarget(t *testing.T, file string) []byte {
	t.Helper()
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != st.Size() {
		t.Errorf("%s: st_size %d, read %d bytes", file, st.Size(), len(b))
	}
	return b
}

// sameAsSource has qemu-img compare a convert-to file's bytes with the
// image in src as it is now.
func sameAsSource(t *testing.T, src, image string, target []byte, format string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(out, target, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := run(t, src, qemuImg, "compare", "-U", "-F", format, image, out); r.code != 0 {
		t.Errorf("%s: the convert-to target differs from the image: exit %d\n%s%s", image, r.code, r.stdout, r.stderr)
	}
}

// TestFUSEConvertToRebuilt changes the source of convert-to targets by
// every path, one of which leaves the image's own file alone, and
// expects the targets rebuilt each time: a new st_size and the new
// content.
func TestFUSEConvertToRebuilt(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	runSteps(t, src, []step{
		create("base.qcow2", "4M", ""),
		qemuIO("qcow2", "base.qcow2", "write -P 0x11 0 64k"),
		overlay("top.qcow2", "base.qcow2", "qcow2", ""),
		qemuIO("qcow2", "top.qcow2", "write -P 0x22 1M 64k"),
		create("b2.qcow2", "4M", ""),
		overlay("t2.qcow2", "b2.qcow2", "qcow2", ""),
		qemuIO("qcow2", "t2.qcow2", "write -P 0x33 2M 64k"),
	})
	mnt := mountImgfs(t, src)
	target := func(image string) string { return filepath.Join(mnt, image, "convert-to", "disk.qcow2") }

	// step changes something, then each listed image's target must
	// have grown by a cluster and hold the image's new content.
	for _, step := range []struct {
		name   string
		change func(t *testing.T)
		images []string
	}{
		{"backing file written on the host", func(t *testing.T) {
			mustRun(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 0x44 3M 64k", "base.qcow2")
		}, []string{"top.qcow2", "base.qcow2"}},
		{"image written on the host", func(t *testing.T) {
			mustRun(t, src, qemuIOPath, "-f", "qcow2", "-c", "write -P 0x55 2M 64k", "top.qcow2")
		}, []string{"top.qcow2"}},
		{"commit into the backing image", func(t *testing.T) {
			mustCtl(t, filepath.Join(mnt, "t2.qcow2"), "commit")
		}, []string{"b2.qcow2"}},
		{"ctl resize", func(t *testing.T) {
			mustCtl(t, filepath.Join(mnt, "t2.qcow2"), "resize 5M")
		}, nil},
	} {
		t.Run(step.name, func(t *testing.T) {
			before := map[string][]byte{}
			for _, img := range []string{"top.qcow2", "base.qcow2", "t2.qcow2", "b2.qcow2"} {
				before[img] = readTarget(t, target(img))
			}
			step.change(t)
			for _, img := range step.images {
				after := readTarget(t, target(img))
				if len(after) <= len(before[img]) {
					t.Errorf("%s: convert-to/disk.qcow2 is %d bytes after the change, was %d", img, len(after), len(before[img]))
				}
				sameAsSource(t, src, img, after, "qcow2")
			}
			if step.images == nil {
				after := readTarget(t, target("t2.qcow2"))
				if bytes.Equal(after, before["t2.qcow2"]) {
					t.Error("t2.qcow2: convert-to/disk.qcow2 unchanged after a resize")
				}
				sameAsSource(t, src, "t2.qcow2", after, "qcow2")
			}
		})
	}
}
