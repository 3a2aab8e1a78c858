package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Differential tests of the reporting commands: run() and the real
// qemu-img get the same arguments on the same files, in the same working
// directory, and must print the same bytes and exit with the same code.

// cmdResult is what one run printed and returned.
type cmdResult struct {
	stdout, stderr string
	code           int
}

// runImgfs runs our command line in-process, named qemu-img so that the
// messages carry qemu-img's prefix.
func runImgfs(args ...string) cmdResult {
	var out, errb bytes.Buffer
	code := run(append([]string{"qemu-img"}, args...), &out, &errb)
	return cmdResult{out.String(), errb.String(), code}
}

// runQemu runs the reference qemu-img.
func runQemu(t *testing.T, args ...string) cmdResult {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command("qemu-img", args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img %s: %v", strings.Join(args, " "), err)
	}
	return cmdResult{out.String(), errb.String(), code}
}

// sameAsQemu runs args with both and reports any difference.
func sameAsQemu(t *testing.T, args ...string) {
	t.Helper()
	want := runQemu(t, args...)
	got := runImgfs(args...)
	if want != got {
		t.Errorf("qemu-img %s:\nexit code: qemu-img %d, imgfs %d\n--- qemu-img stdout:\n%s--- imgfs stdout:\n%s"+
			"--- qemu-img stderr:\n%s--- imgfs stderr:\n%s",
			strings.Join(args, " "), want.code, got.code, want.stdout, got.stdout, want.stderr, got.stderr)
	}
}

// fixture is one step that builds the test images: a qemu-img or
// qemu-io command line, or a Go function on the directory.
type fixture struct {
	prog string
	args []string
	fn   func(dir string) error
	// mayFail: the command is expected to die (qemu-io's abort).
	mayFail bool
}

func qimg(args ...string) fixture { return fixture{prog: "qemu-img", args: args} }
func qio(args ...string) fixture  { return fixture{prog: "qemu-io", args: args} }

// qioCrash runs qemu-io commands and aborts, leaving the image as a
// crashed VM would: with lazy refcounts, dirty.
func qioCrash(args ...string) fixture {
	f := qio(append(args[:len(args)-1:len(args)-1], "-c", "abort", args[len(args)-1])...)
	f.mayFail = true
	return f
}

// patchFile writes b at off in file.
func patchFile(file string, off int64, b ...byte) fixture {
	return fixture{fn: func(dir string) error {
		f, err := os.OpenFile(filepath.Join(dir, file), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteAt(b, off)
		return err
	}}
}

// growFile extends file to size bytes.
func growFile(file string, size int64) fixture {
	return fixture{fn: func(dir string) error { return os.Truncate(filepath.Join(dir, file), size) }}
}

// buildFixtures runs steps in a new directory, makes it the working
// directory of the test, and returns it.
func buildFixtures(t *testing.T, steps []fixture) string {
	t.Helper()
	dir := t.TempDir()
	for _, s := range steps {
		if s.fn != nil {
			if err := s.fn(dir); err != nil {
				t.Fatal(err)
			}
			continue
		}
		cmd := exec.Command(s.prog, s.args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil && !s.mayFail {
			t.Fatalf("%s %s: %v\n%s", s.prog, strings.Join(s.args, " "), err, out)
		}
	}
	t.Chdir(dir)
	return dir
}

// writes is qemu-io's -c list for a pattern spread over clusters of
// size cs: a full cluster, a partial one, one across a boundary and a
// lone sector further on.
func writes(cs int64) []string {
	return []string{
		"-c", fmt.Sprintf("write -P 0x11 0 %d", cs),
		"-c", fmt.Sprintf("write -P 0x22 %d 4096", cs+512),
		"-c", fmt.Sprintf("write -P 0x33 %d 2048", 3*cs-1024),
		"-c", fmt.Sprintf("write -P 0x44 %d 512", 6*cs),
	}
}

func qioWrites(format, file string, cs int64, extra ...string) fixture {
	return qio(append(append(append([]string{"-f", format}, writes(cs)...), extra...), file)...)
}

// reportImages is the image matrix the reporting commands are compared
// on; the names are its files.
var reportImages = []string{
	"raw.img", "empty.qcow2", "v2.qcow2", "c512.qcow2", "c2m.qcow2", "compressed.qcow2",
	"zero.qcow2", "l2ext.qcow2", "base.qcow2", "mid.qcow2", "top.qcow2", "short-top.qcow2",
	"snap.qcow2", "bitmaps.qcow2", "datafile.qcow2", "lazy.qcow2", "dirty.qcow2", "leaks.qcow2", "corrupt.qcow2",
	"datafile-raw.qcow2", "prealloc-meta.qcow2", "prealloc-full.qcow2", "refbits1.qcow2",
}

func reportFixtures() []fixture {
	steps := []fixture{
		qimg("create", "-q", "-f", "raw", "raw.img", "4M"),
		qio("-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0 2M 64k", "raw.img"),
		qimg("create", "-q", "-f", "qcow2", "empty.qcow2", "1G"),
		qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "16M"),
		qioWrites("qcow2", "v2.qcow2", 65536),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "c512.qcow2", "8M"),
		qioWrites("qcow2", "c512.qcow2", 512, "-c", "write -P 0x66 1M 300k"),
		qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m.qcow2", "64M"),
		qioWrites("qcow2", "c2m.qcow2", 2<<20),
		qimg("create", "-q", "-f", "qcow2", "src.qcow2", "8M"),
		qioWrites("qcow2", "src.qcow2", 65536),
		qimg("convert", "-c", "-O", "qcow2", "src.qcow2", "compressed.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "zero.qcow2", "8M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -z 64k 64k", "-c", "write -z 1M 128k",
			"-c", "write -z -u 192k 64k", "zero.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "l2ext.qcow2", "8M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "write -P 2 40k 8k", "-c", "write -z 64k 2k",
			"-c", "write -P 3 1M 64k", "l2ext.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "base.qcow2", "16M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 64k", "base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"),
		qio("-f", "qcow2", "-c", "write -P 3 512k 64k", "-c", "write -z 4M 64k", "mid.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"),
		qio("-f", "qcow2", "-c", "write -P 4 0 64k", "-c", "write -P 5 8M 64k", "top.qcow2"),
		// A backing image shorter than its overlay.
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "short-top.qcow2", "32M"),
		qimg("create", "-q", "-f", "qcow2", "snap.qcow2", "16M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 64k", "snap.qcow2"),
		qimg("snapshot", "-c", "first", "snap.qcow2"),
		qio("-f", "qcow2", "-c", "write -P 2 0 64k", "snap.qcow2"),
		qimg("snapshot", "-c", "second-with-a-long-name", "snap.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "bitmaps.qcow2", "16M"),
		qimg("bitmap", "--add", "bitmaps.qcow2", "b0"),
		qimg("bitmap", "--add", "-g", "128k", "--disable", "bitmaps.qcow2", "b1"),
		qimg("create", "-q", "-f", "qcow2", "-o", "data_file=datafile.raw", "datafile.qcow2", "8M"),
		qio("-f", "qcow2", "-c", "write -P 7 0 1M", "datafile.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "data_file=datafile-raw.raw,data_file_raw=on", "datafile-raw.qcow2", "8M"),
		qio("-f", "qcow2", "-c", "write -P 7 1M 1M", "datafile-raw.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "prealloc-meta.qcow2", "8M"),
		qioWrites("qcow2", "prealloc-meta.qcow2", 65536),
		qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=full", "prealloc-full.qcow2", "4M"),
		qimg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "refbits1.qcow2", "8M"),
		qioWrites("qcow2", "refbits1.qcow2", 65536),
		qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy.qcow2", "8M"),
		qioWrites("qcow2", "lazy.qcow2", 65536),
		qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "8M"),
		qioCrash("-f", "qcow2", "-c", "write -P 1 0 128k", "dirty.qcow2"),
		// Two clusters with a refcount but no reference: leaks. The
		// refcount block of a new 64 KiB-cluster image is cluster 2.
		qimg("create", "-q", "-f", "qcow2", "leaks.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write 0 128k", "leaks.qcow2"),
		growFile("leaks.qcow2", 10*65536),
		patchFile("leaks.qcow2", 2*65536+2*8, 0, 1, 0, 1),
		// A data cluster (cluster 5) whose refcount is 0: corruption.
		qimg("create", "-q", "-f", "qcow2", "corrupt.qcow2", "64M"),
		qio("-f", "qcow2", "-c", "write 0 128k", "corrupt.qcow2"),
		patchFile("corrupt.qcow2", 2*65536+2*5, 0, 0),
	}
	return steps
}

// TestCommonErrors compares the messages of the shared open path.
func TestCommonErrors(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "q.qcow2", "1M"),
		qimg("create", "-q", "-f", "raw", "r.raw", "1M"),
	})
	for _, args := range [][]string{
		{"info", "nope"},
		{"info", "-f", "qcow2", "r.raw"},
		{"info", "-f", "bogus", "r.raw"},
		{"info", "--image-opts", "-f", "qcow2", "q.qcow2"},
		{"info", "--image-opts", "driver=qcow2,file.filename=q.qcow2"},
		{"info", "--image-opts", "file.filename=q.qcow2"},
		{"info", "--image-opts", "q.qcow2"},
		{"info", "--image-opts", "driver=qcow2"},
		{"info", "--image-opts", "driver=foo,file.filename=q.qcow2"},
		{"info", "--image-opts", "driver=qcow2,file.filename=nope"},
		{"info", "--image-opts", "driver=qcow2,file.filename=q.qcow2,bogus=1"},
		{"info", "--image-opts", "driver=qcow2,file.filename=q.qcow2,file.bogus=1"},
		{"info", "-U", "--image-opts", "driver=qcow2,file.filename=q.qcow2,force-share=off"},
		{"info", "--object", "secret,id=s0,data=abc", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=x", "--object", "secret,id=s1,file=r.raw", "q.qcow2"},
		{"info", "--object", "foo", "q.qcow2"},
		{"info", "--object", "secret", "q.qcow2"},
		{"info", "--object", "secret,id=s0", "q.qcow2"},
		{"info", "--object", "secret,id=0bad,data=x", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=x,bogus=1", "q.qcow2"},
		{"info", "--object", "secret,id=s0,file=/nonexistent", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=abc,format=base64", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=YWJj,format=base64", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=!!!!,format=base64", "q.qcow2"},
		{"info", "--object", "secret,id=s0,data=x,format=hex", "q.qcow2"},
		{"info", "--output=xml", "q.qcow2"},
		{"info"},
		{"info", "a", "b"},
		{"check", "-r", "leaks", "r.raw"},
		{"check", "-T", "bogus", "q.qcow2"},
		{"check", "-T", "writethrough", "q.qcow2"},
	} {
		sameAsQemu(t, args...)
	}
}

// -T none opens the images with O_DIRECT, which needs aligned I/O.
func TestDirectCacheMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "q.qcow2", "1M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 4k", "q.qcow2"),
	})
	sameAsQemu(t, "check", "-T", "none", "q.qcow2")
	sameAsQemu(t, "compare", "-T", "directsync", "q.qcow2", "q.qcow2")
}

// An image that a running qemu-io has open for writing is locked: the
// commands refuse it unless -U shares it.
func TestLockedImageMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{qimg("create", "-q", "-f", "qcow2", "busy.qcow2", "1M")})
	// The holder sleeps far longer than the test runs; it is killed below.
	holder := exec.Command("qemu-io", "-f", "qcow2", "-c", "sleep 600000", "busy.qcow2")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		holder.Process.Kill()
		holder.Wait()
	}()
	// qemu-io can take seconds to start on a loaded machine.
	for deadline := time.Now().Add(time.Minute); runQemu(t, "info", "busy.qcow2").code == 0; {
		if time.Now().After(deadline) {
			t.Fatal("qemu-io did not lock the image within a minute")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, args := range [][]string{
		{"info", "busy.qcow2"},
		{"info", "-U", "busy.qcow2"},
		{"map", "busy.qcow2"},
		{"map", "-U", "busy.qcow2"},
		{"check", "busy.qcow2"},
		{"compare", "busy.qcow2", "busy.qcow2"},
		{"compare", "-U", "busy.qcow2", "busy.qcow2"},
	} {
		sameAsQemu(t, args...)
	}
}

// TestTraceOptionsIgnored: qemu-img's global -T/--trace options are
// accepted with a warning and the command still runs.
func TestTraceOptionsIgnored(t *testing.T) {
	buildFixtures(t, []fixture{qimg("create", "-q", "-f", "qcow2", "t.qcow2", "1M")})
	want := runQemu(t, "info", "t.qcow2")
	for _, args := range [][]string{
		{"-T", "bdrv_*", "info", "t.qcow2"},
		{"--trace", "events=/nonexist", "info", "t.qcow2"},
		{"--trace=bdrv_open", "-Tqcow2_*", "info", "t.qcow2"},
	} {
		got := runImgfs(args...)
		if got.code != 0 || got.stdout != want.stdout || !strings.Contains(got.stderr, "warning: tracing is not supported") {
			t.Errorf("%v: %+v", args, got)
		}
	}
	if got := runImgfs("-T"); got.code != 1 || !strings.Contains(got.stderr, "missing argument for option '-T'") {
		t.Errorf("-T without a value: %+v", got)
	}
}
