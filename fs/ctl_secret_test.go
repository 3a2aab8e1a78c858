package fs

import (
	"maps"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestCtlSecrets reads amend's --object definitions against a mount of
// dir whose passphrase is "pw": their data, the files they name (inside
// the directory only, unless the mount allows outside paths), and the
// refusals with their errno.
func TestCtlSecrets(t *testing.T) {
	dir, outside := t.TempDir(), t.TempDir()
	for name, data := range map[string]string{
		filepath.Join(dir, "k1"):     "from file\n",
		filepath.Join(outside, "k2"): "outside",
	} {
		if err := os.WriteFile(name, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	big := filepath.Join(dir, "big")
	if err := os.WriteFile(big, make([]byte, maxSecretFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	k2 := filepath.Join(outside, "k2")
	realDir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	mountKey := map[string][]byte{passphraseID: []byte("pw")}
	tests := []struct {
		line         string
		allowOutside bool
		want         map[string][]byte // besides the mount's passphrase
		errno        syscall.Errno
	}{
		{line: "amend -o x=y", want: map[string][]byte{}},
		{line: "amend --object secret,id=s1,data=abc -o x=y", want: map[string][]byte{"s1": []byte("abc")}},
		{line: "amend --object secret,id=s1,data=a,,b --object secret,id=s2,data= -o x=y",
			want: map[string][]byte{"s1": []byte("a,b"), "s2": {}}},
		{line: "amend --object secret,id=s1,file=k1 -o x=y", want: map[string][]byte{"s1": []byte("from file\n")}},
		{line: "amend --object secret,id=s1,file=" + filepath.Join(dir, "k1") + " -o x=y",
			want: map[string][]byte{"s1": []byte("from file\n")}},
		{line: "amend --object secret,id=s1,file=" + k2 + " -o x=y", errno: syscall.EACCES},
		{line: "amend --object secret,id=s1,file=../" + filepath.Base(outside) + "/k2 -o x=y", errno: syscall.EACCES},
		{line: "amend --object secret,id=s1,file=" + k2 + " -o x=y", allowOutside: true,
			want: map[string][]byte{"s1": []byte("outside")}},
		{line: "amend --object secret,id=s1,file=nosuch -o x=y", errno: syscall.ENOENT},
		{line: "amend --object secret,id=s1,file=big -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,id=s1,data=a,file=k1 -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,id=s1 -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,data=a -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,id=s1,data=a,format=base64 -o x=y", errno: syscall.EINVAL},
		{line: "amend --object iothread,id=s1 -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,id=s1,data=a --object secret,id=s1,data=b -o x=y", errno: syscall.EINVAL},
		{line: "amend --object secret,id=" + passphraseID + ",data=a -o x=y", errno: syscall.EINVAL},
	}
	for _, tt := range tests {
		l, err := parseCtl(tt.line)
		if err != nil {
			t.Fatalf("parseCtl(%q): %v", tt.line, err)
		}
		d := &imageDir{t: &tree{src: &source{dir: dir, realDir: realDir, allowOutside: tt.allowOutside,
			secrets: maps.Clone(mountKey), keySecret: passphraseID}}}
		got, err := d.ctlSecrets(l)
		if tt.errno != 0 {
			if Errno(err) != tt.errno {
				t.Errorf("%q: %v (errno %v), want errno %v", tt.line, err, Errno(err), tt.errno)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tt.line, err)
			continue
		}
		want := maps.Clone(tt.want)
		maps.Copy(want, mountKey)
		if !maps.EqualFunc(got, want, func(a, b []byte) bool { return string(a) == string(b) }) {
			t.Errorf("%q: secrets %q, want %q", tt.line, got, want)
		}
		if string(d.t.src.secrets[passphraseID]) != "pw" || len(d.t.src.secrets) != 1 {
			t.Errorf("%q: the mount's own secrets changed to %q", tt.line, d.t.src.secrets)
		}
	}
}

// TestCtlSecretsWithoutPassphrase: a mount without -o key_file has only
// the line's secrets.
func TestCtlSecretsWithoutPassphrase(t *testing.T) {
	l, err := parseCtl("amend --object secret,id=s1,data=abc -o x=y")
	if err != nil {
		t.Fatal(err)
	}
	d := &imageDir{t: &tree{src: &source{dir: t.TempDir()}}}
	got, err := d.ctlSecrets(l)
	if err != nil || len(got) != 1 || string(got["s1"]) != "abc" {
		t.Errorf("secrets %q, %v; want only s1", got, err)
	}
}

func TestRedactSecrets(t *testing.T) {
	tests := []struct{ line, want string }{
		{"amend -o state=active,new-secret=s1", "amend -o state=active,new-secret=s1"},
		{"amend --object secret,id=s1,data=hunter2 -o new-secret=s1 --object secret,id=s2,data=x",
			"amend --object (secret) -o new-secret=s1 --object (secret)"},
		{"amend --object", "amend --object"},
	}
	for _, tt := range tests {
		if got := redactSecrets(tt.line); got != tt.want {
			t.Errorf("redactSecrets(%q) = %q, want %q", tt.line, got, tt.want)
		}
	}
}
