package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLUKSResizeCLI runs imgfs resize and qemu-img resize on copies of
// a LUKS image and of a qcow2 image with LUKS encryption: same output,
// messages and exit code, and the same file afterwards, for grows and
// shrinks (aligned or not, with each preallocation) and the refusals.
func TestLUKSResizeCLI(t *testing.T) {
	src := t.TempDir()
	images := []struct {
		file, opts string
		create     []string
	}{
		{"t.luks", "driver=luks,key-secret=sec0,file.filename=t.luks",
			[]string{"-f", "luks", "-o", lukskey}},
		{"e.qcow2", "driver=qcow2,encrypt.key-secret=sec0,file.filename=e.qcow2",
			[]string{"-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50"}},
	}
	cases := [][]string{
		{"+1M"},
		{"+1000"},
		{"--preallocation=falloc", "+1M"},
		{"--preallocation=full", "+700"},
		{"--preallocation=full", "+1M"},
		{"--preallocation=metadata", "+1M"},
		{"--preallocation=bogus", "+1M"},
		{"--", "-512K"},
		{"--shrink", "--", "-512K"},
		{"--shrink", "--", "-100"},
		{"--shrink", "--preallocation=falloc", "--", "-512K"},
		{"--shrink", "--", "-1M"},
		{"1P"},
	}
	for _, img := range images {
		create := append(append([]string{"create", "-q", "--object", secretObject}, img.create...), img.file, "1M")
		if r := runQemuImg(t, src, create...); r.code != 0 {
			t.Fatalf("qemu-img %q: exit %d\n%s", create, r.code, r.stderr)
		}
		mustRun(t, src, qemuIOPath, "--object", secretObject, "--image-opts", "-c", "write -P 0x5c 0 1M", img.opts)
		orig, err := os.ReadFile(filepath.Join(src, img.file))
		if err != nil {
			t.Fatal(err)
		}
		for _, args := range cases {
			t.Run(img.file+" "+strings.Join(args, " "), func(t *testing.T) {
				line := append([]string{"resize", "--object", secretObject, "--image-opts", img.opts}, args...)
				var results []result
				var files [][]byte
				for _, prog := range []string{qemuImg, ours} {
					dir := t.TempDir()
					name := filepath.Join(dir, img.file)
					if err := os.WriteFile(name, orig, 0o644); err != nil {
						t.Fatal(err)
					}
					results = append(results, run(t, dir, prog, line...))
					b, err := os.ReadFile(name)
					if err != nil {
						t.Fatal(err)
					}
					files = append(files, b)
				}
				if d := diffResults(results[0], results[1]); d != "" {
					t.Errorf("qemu-img %s:\n%s", strings.Join(line, " "), d)
				}
				if !bytes.Equal(files[0], files[1]) {
					t.Errorf("the images differ at byte %d (%d and %d bytes)", firstByteDiff(files[0], files[1]), len(files[0]), len(files[1]))
				}
			})
		}
	}
}
