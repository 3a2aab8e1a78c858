package formats_test

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

func TestAccessPerms(t *testing.T) {
	const r, w, wu, rs = formats.PermConsistentRead, formats.PermWrite, formats.PermWriteUnchanged, formats.PermResize
	all := formats.PermAll
	// The lock bytes in the comments are what strace shows qemu-img and
	// qemu-io 7.2 taking for the same use.
	tests := []struct {
		name         string
		a            formats.Access
		perm, shared formats.Perm
	}{
		{"raw read-only (map, compare)", formats.Access{}, r, all},                            // 100
		{"raw read-write (qemu-io)", formats.Access{Write: true}, r | w, all},                 // 100 101
		{"raw resize", formats.Access{Write: true, Resize: true}, r | w | rs, all},            // 100 101 103
		{"raw info", formats.Access{NoIO: true}, 0, all},                                      // none
		{"qcow2 read-only", formats.Access{Metadata: true}, r, all &^ (w | rs)},               // 100 201 203
		{"qcow2 read-write", formats.Access{Metadata: true, Write: true}, r | w | rs, r | wu}, // 100 101 103 201 203
		{"qcow2 info", formats.Access{Metadata: true, NoIO: true}, 0, r | wu},                 // 201 203
		{"qcow2 -U", formats.Access{Metadata: true, ForceShare: true}, r, all},                // 100
		{"qcow2 info -U", formats.Access{Metadata: true, NoIO: true, ForceShare: true}, 0, all},
	}
	for _, tc := range tests {
		if p := tc.a.Perms(); p.Hold != tc.perm || p.Share != tc.shared {
			t.Errorf("%s: Perms() = %v / %v, want %v / %v", tc.name, p.Hold, p.Share, tc.perm, tc.shared)
		}
	}
}

func TestPermString(t *testing.T) {
	for p, want := range map[formats.Perm]string{
		formats.PermWrite:                             "write",
		formats.PermConsistentRead:                    "consistent read",
		formats.PermWriteUnchanged:                    "write unchanged",
		formats.PermResize:                            "resize",
		formats.PermWrite | formats.PermResize:        "write, resize",
		formats.PermAll &^ formats.PermWriteUnchanged: "consistent read, write, resize",
	} {
		if got := p.String(); got != want {
			t.Errorf("%#x.String() = %q, want %q", uint8(p), got, want)
		}
	}
}

// lockUse is one way of using an image, as qemu-io/qemu-img run it and as
// imgfs describes it.
type lockUse struct {
	name   string
	access formats.Access
	qemu   []string // command line before the file name; nil: cannot hold
	holder []string // qemu-io command line that keeps the image open
}

var lockUses = []lockUse{
	{"raw-ro", formats.Access{}, []string{"qemu-io", "-r", "-f", "raw", "-c", "quit"}, []string{"qemu-io", "-r", "-f", "raw"}},
	{"raw-rw", formats.Access{Write: true}, []string{"qemu-io", "-f", "raw", "-c", "quit"}, []string{"qemu-io", "-f", "raw"}},
	{"qcow2-ro", formats.Access{Metadata: true}, []string{"qemu-io", "-r", "-f", "qcow2", "-c", "quit"}, []string{"qemu-io", "-r", "-f", "qcow2"}},
	{"qcow2-rw", formats.Access{Metadata: true, Write: true}, []string{"qemu-io", "-f", "qcow2", "-c", "quit"}, []string{"qemu-io", "-f", "qcow2"}},
	{"qcow2-U", formats.Access{Metadata: true, ForceShare: true}, []string{"qemu-io", "-U", "-r", "-f", "qcow2", "-c", "quit"}, []string{"qemu-io", "-U", "-r", "-f", "qcow2"}},
	{"qcow2-info", formats.Access{Metadata: true, NoIO: true}, []string{"qemu-img", "info", "-f", "qcow2"}, nil},
}

// qemuOpen runs u's qemu command on name and returns its lock error
// message without the program's prefix, or "" when it succeeds.
func qemuOpen(t *testing.T, u lockUse, name string) string {
	t.Helper()
	out, err := exec.Command(u.qemu[0], append(u.qemu[1:], name)...).CombinedOutput()
	if err == nil {
		return ""
	}
	msg := string(out)
	for _, prefix := range []string{"qemu-io: can't open device " + name + ": ", "qemu-img: Could not open '" + name + "': "} {
		msg = strings.TrimPrefix(msg, prefix)
	}
	return strings.TrimSuffix(msg, "\n")
}

// qemuHold starts u's holder on name and returns once the image is open.
func qemuHold(t *testing.T, u lockUse, name string) (release func()) {
	t.Helper()
	cmd := exec.Command(u.holder[0], append(u.holder[1:], name)...)
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// A command answered means the image is open and its locks taken.
	in.Write([]byte("read 0 1\n"))
	sc := bufio.NewScanner(out)
	for sc.Scan() && !strings.Contains(sc.Text(), "read 1/1 bytes") {
	}
	return func() {
		in.Close()
		cmd.Wait()
	}
}

// ourOpen locks name for u and returns the error text, or "".
func ourOpen(t *testing.T, u lockUse, name string) string {
	t.Helper()
	f, err := formats.OpenFile(name, !u.access.Write, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = formats.LockFile(f, u.access.Perms())
	if err == nil {
		return ""
	}
	if !errors.Is(err, formats.ErrLocked) {
		t.Errorf("lock error %v does not match ErrLocked", err)
	}
	return err.Error()
}

// TestLockAgainstQemu checks every pair of uses in both directions: with
// qemu-io holding the image, imgfs must fail exactly as a second qemu
// does; with imgfs holding it, qemu must fail exactly as it does against
// itself.
func TestLockAgainstQemu(t *testing.T) {
	formatstest.RequireQemu(t)
	name := filepath.Join(t.TempDir(), "l.qcow2")
	formatstest.Exec(t, "qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
	conflicts := 0
	for _, holder := range lockUses {
		if holder.holder == nil {
			continue
		}
		want := map[string]string{}
		release := qemuHold(t, holder, name)
		for _, opener := range lockUses {
			want[opener.name] = qemuOpen(t, opener, name)
			if got := ourOpen(t, opener, name); got != want[opener.name] {
				t.Errorf("qemu holds %s, imgfs opens %s: %q, qemu says %q", holder.name, opener.name, got, want[opener.name])
			}
			if want[opener.name] != "" {
				conflicts++
				t.Logf("%s holds, %s opens: %q", holder.name, opener.name, want[opener.name])
			}
		}
		release()

		f, err := formats.OpenFile(name, !holder.access.Write, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := formats.LockFile(f, holder.access.Perms()); err != nil {
			t.Fatalf("lock %s on an unused image: %v", holder.name, err)
		}
		for _, opener := range lockUses {
			if got := qemuOpen(t, opener, name); got != want[opener.name] {
				t.Errorf("imgfs holds %s, qemu opens %s: %q, want %q", holder.name, opener.name, got, want[opener.name])
			}
		}
		f.Close()
	}
	// The table must exercise both kinds of message.
	if conflicts < 4 {
		t.Errorf("only %d conflicting pairs; the test lost its teeth", conflicts)
	}
}

// TestLockUpdate checks raising and dropping permissions on one file
// against a second open file of the same image (OFD locks conflict
// between open files of one process too).
func TestLockUpdate(t *testing.T) {
	name := filepath.Join(t.TempDir(), "u.img")
	if err := os.WriteFile(name, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	open := func(readOnly bool) *formats.File {
		f, err := formats.OpenFile(name, readOnly, false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	f1, f2 := open(false), open(true)
	hint := "\nIs another process using the image [" + name + "]?"
	l1, err := formats.LockFile(f1, formats.Access{Metadata: true}.Perms())
	if err != nil {
		t.Fatal(err)
	}
	// f1 denies write to others: f2 cannot write.
	if _, err := formats.LockFile(f2, formats.Access{Metadata: true, Write: true}.Perms()); err == nil ||
		err.Error() != `Failed to get "write" lock`+hint {
		t.Fatalf("second writer: %v", err)
	}
	l2, err := formats.LockFile(f2, formats.Access{}.Perms())
	if err != nil {
		t.Fatalf("second reader: %v", err)
	}
	// f2 reads without denying writes, so f1 may become a writer ...
	if err := l1.Update(formats.Access{Metadata: true, Write: true}.Perms()); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	// ... and then f2 may not deny write.
	if err := l2.Update(formats.Access{Metadata: true}.Perms()); err == nil ||
		err.Error() != `Failed to get shared "write" lock`+hint {
		t.Fatalf("f2 denying write to a writer: %v", err)
	}
	// The failed update left f2's consistent-read lock in place.
	deny := formats.Perms{Hold: formats.Access{Write: true}.Perms().Hold, Share: formats.PermAll &^ formats.PermConsistentRead}
	if err := l1.Update(deny); err == nil ||
		err.Error() != `Failed to get shared "consistent read" lock`+hint {
		t.Fatalf("denying consistent read to a reader: %v", err)
	}
	if err := l1.Release(); err != nil {
		t.Fatal(err)
	}
	if err := l2.Update(formats.Access{Metadata: true}.Perms()); err != nil {
		t.Fatalf("after release: %v", err)
	}
}

func TestCreateFileLocks(t *testing.T) {
	name := filepath.Join(t.TempDir(), "c.img")
	f := createFile(t, name)
	f.WriteAt([]byte("data"), 0)
	// An image held by a writer that denies writes cannot be created over.
	l, err := formats.LockFile(f, formats.Access{Metadata: true, Write: true}.Perms())
	if err != nil {
		t.Fatal(err)
	}
	if g, err := formats.CreateFile(name); err == nil || err.Error() != "Failed to get \"write\" lock\nIs another process using the image ["+name+"]?" {
		t.Errorf("CreateFile over a locked image: %v", err)
		if g != nil {
			g.Close()
		}
	}
	if size, _ := f.Size(); size != 4 {
		t.Errorf("a refused CreateFile truncated the image to %d bytes", size)
	}
	l.Release()
	g := createFile(t, name)
	if size, _ := g.Size(); size != 0 {
		t.Errorf("CreateFile left %d bytes", size)
	}
}

func createFile(t *testing.T, name string) *formats.File {
	t.Helper()
	f, err := formats.CreateFile(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestCloseReleasesLocks: an OFD lock lasts as long as any descriptor of
// its open file description, such as one a child forked meanwhile holds
// until it execs (here a dup stands for it). Close must drop the lock
// bytes itself, or the image stays locked after we are done with it.
func TestCloseReleasesLocks(t *testing.T) {
	name := filepath.Join(t.TempDir(), "c.img")
	if err := os.WriteFile(name, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	f1, err := formats.OpenFile(name, false, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := formats.LockFile(f1, formats.Access{Metadata: true, Write: true}.Perms()); err != nil {
		t.Fatal(err)
	}
	dup, err := unix.Dup(int(f1.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dup)
	if err := f1.Close(); err != nil {
		t.Fatal(err)
	}
	f2, err := formats.OpenFile(name, false, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Close()
	if _, err := formats.LockFile(f2, formats.Access{Metadata: true, Write: true}.Perms()); err != nil {
		t.Fatalf("after Close, with a duplicate descriptor still open: %v", err)
	}
}
