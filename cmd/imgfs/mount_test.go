package main

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestParseMountOptions(t *testing.T) {
	tests := []struct {
		opts    []string
		wantErr bool
		check   func(*mountConfig) bool
	}{
		{[]string{"ro"}, false, func(c *mountConfig) bool { return c.fs.ReadOnly }},
		{[]string{"ro,rw"}, false, func(c *mountConfig) bool { return !c.fs.ReadOnly }},
		{[]string{"allow_other", "uid=1000,gid=100"}, false, func(c *mountConfig) bool {
			return c.mo.AllowOther && c.fs.UID == 1000 && c.fs.GID == 100
		}},
		{[]string{"allow_root,allow_outside"}, false, func(c *mountConfig) bool { return c.fs.AllowRoot && c.fs.AllowOutside }},
		// What mount.fuse3 passes from an fstab line.
		{[]string{"rw,noauto,user,x-systemd.automount,nodev,suid,dev"}, false, func(c *mountConfig) bool {
			return slices.Equal(c.mo.Options, []string{"nodev", "suid", "dev"})
		}},
		{[]string{"default_permissions,fsname=imgs,subtype=imgfs2"}, false, func(c *mountConfig) bool {
			return slices.Contains(c.mo.Options, "default_permissions") && c.mo.FsName == "imgs" && c.mo.Name == "imgfs2"
		}},
		{[]string{"ro,key_file=/etc/imgfs.key"}, false, func(c *mountConfig) bool { return c.keyFile == "/etc/imgfs.key" }},
		{[]string{"key_file=rel/key"}, false, func(c *mountConfig) bool {
			wd, _ := os.Getwd()
			return c.keyFile == filepath.Join(wd, "rel/key")
		}},
		{[]string{"uid=x"}, true, nil},
		{[]string{"bogus"}, true, nil},
		{[]string{"allow_root,allow_other"}, true, nil},
	}
	for _, tt := range tests {
		cfg, err := parseMountOptions(tt.opts)
		if (err != nil) != tt.wantErr {
			t.Errorf("%q: error %v, want error %v", tt.opts, err, tt.wantErr)
			continue
		}
		if err == nil && !tt.check(cfg) {
			t.Errorf("%q: got %+v", tt.opts, cfg)
		}
	}
}

func TestAbsKeyFile(t *testing.T) {
	got := absKeyFile([]string{"ro,key_file=k", "allow_other"}, "/abs/k")
	if want := []string{"ro,key_file=/abs/k", "allow_other"}; !slices.Equal(got, want) {
		t.Errorf("absKeyFile = %q, want %q", got, want)
	}
	if got := absKeyFile([]string{"ro"}, ""); !slices.Equal(got, []string{"ro"}) {
		t.Errorf("absKeyFile without a key file = %q", got)
	}
}

func TestMountHelperArgs(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	isCommand := func(s string) bool { return s == "info" || s == "mount" }
	tests := []struct {
		args    []string
		want    []string
		wantErr bool
	}{
		// Ordinary command lines are left alone.
		{[]string{"imgfs", "info", img}, []string{"imgfs", "info", img}, false},
		{[]string{"imgfs", "mount", img, dir}, []string{"imgfs", "mount", img, dir}, false},
		{[]string{"imgfs", "nosuchcmd", "x"}, []string{"imgfs", "nosuchcmd", "x"}, false},
		// mount.fuse3 runs the subtype: imgfs SOURCE MOUNTPOINT -o OPTS.
		{[]string{"imgfs", img, dir, "-o", "rw,dev,suid"}, []string{"imgfs", "mount", "-o", "rw,dev,suid", "--", img, dir}, false},
		// mount(8) runs mount.fuse.imgfs with its own flags.
		{[]string{"/sbin/mount.fuse.imgfs", img, dir, "-n", "-o", "ro", "-t", "fuse.imgfs"},
			[]string{"/sbin/mount.fuse.imgfs", "mount", "-o", "ro", "--", img, dir}, false},
		{[]string{"mount.imgfs", img, dir}, []string{"mount.imgfs", "mount", "--", img, dir}, false},
		{[]string{"mount.imgfs", img, dir, "-f"}, nil, true},
		{[]string{"mount.imgfs", img, dir, "extra"}, nil, true},
		{[]string{"mount.imgfs", img, dir, "-o"}, nil, true},
	}
	for _, tt := range tests {
		got, err := mountHelperArgs(tt.args, isCommand)
		if (err != nil) != tt.wantErr {
			t.Errorf("%q: error %v, want error %v", tt.args, err, tt.wantErr)
			continue
		}
		if err == nil && !slices.Equal(got, tt.want) {
			t.Errorf("%q: got %q, want %q", tt.args, got, tt.want)
		}
	}
}

func TestCheckMountpoint(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	mnt := filepath.Join(dir, "mnt")
	for _, d := range []string{src, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		source, mountpoint string
		ok                 bool
	}{
		{src, mnt, true},
		{src, src, false},
		{src, dir, false}, // the mount would hide SOURCE
		{filepath.Join(dir, "missing"), mnt, false},
	} {
		if err := checkMountpoint(tt.source, tt.mountpoint); (err == nil) != tt.ok {
			t.Errorf("checkMountpoint(%s, %s) = %v, want ok=%v", tt.source, tt.mountpoint, err, tt.ok)
		}
	}
}
