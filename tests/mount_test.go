package tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// mountCompared maps the report files of an image's directory in the
// mount to the qemu-img command whose output each must equal.
var mountCompared = []struct {
	file string
	cmd  []string
}{
	{"info", []string{"info"}},
	{"info.json", []string{"info", "--output=json"}},
	{"map.json", []string{"map", "--output=json"}},
	{"check", []string{"check"}},
}

// checkMount mounts the directory of a matrix image read-only with imgfs
// and reads the image through it: the disk file must hold the guest
// bytes (qemu-img compare against the image) and the report files what
// qemu-img prints about the image, in its format, by its absolute name,
// which is the name the mount reports. The mount helpers are fuse_test.go's.
func checkMount(t *testing.T, dir string, c imageCase) {
	requireFUSE(t)
	mnt := mountImgfs(t, dir, "ro")
	imgDir := filepath.Join(mnt, c.file())
	disk := filepath.Join(imgDir, "disk")
	// qemu-img compare walks a raw file 32 MiB at a time, two lseeks a
	// step; through FUSE a terabyte of that takes minutes.
	if !c.big {
		if r := run(t, dir, qemuImg, "compare", "-f", "raw", "-F", c.fmt(), disk, c.file()); r.code != 0 {
			t.Errorf("qemu-img compare %s %s: exit %d\n%s%s", disk, c.file(), r.code, r.stdout, r.stderr)
		}
	}
	abs := filepath.Join(dir, c.file())
	for _, m := range mountCompared {
		// -f: the mount names the format where qemu-img's probe cannot
		// (a fixed VHD probes as raw).
		want := run(t, dir, qemuImg, append(m.cmd, "-f", c.fmt(), abs)...)
		got, err := os.ReadFile(filepath.Join(imgDir, m.file))
		if err != nil {
			t.Errorf("read %s: %v", m.file, err)
			continue
		}
		// The check file holds the whole report: the per-cluster lines
		// qemu-img prints on stderr, then the summary, and messages
		// without a program name.
		wantText := strings.ReplaceAll(want.stderr, "qemu-img: ", "") + want.stdout
		if m.file != "check" {
			wantText = want.stdout
		}
		if wantText != string(got) {
			t.Errorf("%s differs from qemu-img %s %s %s\n--- qemu-img:\n%s--- mount:\n%s",
				m.file, strings.Join(m.cmd, " "), abs, firstDiff(wantText, string(got)), wantText, got)
		}
	}
}
