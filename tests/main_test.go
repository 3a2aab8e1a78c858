package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Paths of the programs the tests run, set by TestMain.
var (
	// ours is the freshly built imgfs, reached through a symlink named
	// qemu-img so that its messages carry the same prefix as the real one.
	ours string
	// qemuImg and qemuIOPath are the reference tools.
	qemuImg    string
	qemuIOPath string
)

// commandTimeout bounds every program the tests start, so a hung imgfs
// fails its test instead of the whole run.
const commandTimeout = 2 * time.Minute

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	var err error
	for _, p := range []struct {
		dst  *string
		name string
	}{{&qemuImg, "qemu-img"}, {&qemuIOPath, "qemu-io"}} {
		if *p.dst, err = exec.LookPath(p.name); err != nil {
			fmt.Fprintf(os.Stderr, "tests: %s not found (install qemu-utils, or run `make test`, which does): %v\n", p.name, err)
			return 1
		}
	}
	dir, err := os.MkdirTemp("", "imgfs-tests-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if ours, err = buildImgfs(dir); err != nil {
		fmt.Fprintln(os.Stderr, "tests: building imgfs:", err)
		return 1
	}
	return m.Run()
}

// buildImgfs compiles cmd/imgfs into dir and links dir/qemu-img to it.
// When the tests run with -race the binary is built with it too, so data
// races inside the commands surface as failures here.
func buildImgfs(dir string) (string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = "/usr/local/go/bin/go"
	}
	bin := filepath.Join(dir, "imgfs")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
		// The race runtime sleeps a second at exit by default, which
		// would dominate the run time of hundreds of short commands.
		os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	}
	cmd := exec.Command(goTool, append(args, "./cmd/imgfs")...)
	cmd.Dir = ".." // the module root; go test runs in the package directory
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%v\n%s", err, out)
	}
	link := filepath.Join(dir, "qemu-img")
	if err := os.Symlink(bin, link); err != nil {
		return "", err
	}
	return link, nil
}

// result is what a program run produced.
type result struct {
	stdout, stderr string
	code           int
}

// run starts prog with args in dir and waits for it. A program that
// cannot start or runs past commandTimeout fails the test.
func run(t testing.TB, dir, prog string, args ...string) result {
	t.Helper()
	return runGuarded(t, dir, nil, prog, args...)
}

// allocGuard stops a program whose output file occupies more than max
// bytes on disk: a convert that fails to keep a huge sparse image sparse
// would otherwise fill the machine's disk before it times out.
type allocGuard struct {
	file string
	max  int64
}

// runGuarded is run with an optional allocGuard.
func runGuarded(t testing.TB, dir string, guard *allocGuard, prog string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s %s: %v", prog, strings.Join(args, " "), err)
	}
	overLimit := make(chan int64, 1)
	if guard != nil {
		go watchAllocation(ctx, guard, cmd.Process, overLimit)
	}
	err := cmd.Wait()
	cancel()
	select {
	case n := <-overLimit:
		t.Fatalf("%s %s: killed: %s occupied %d bytes on disk (limit %d)",
			prog, strings.Join(args, " "), guard.file, n, guard.max)
	default:
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("%s %s: timed out after %v", prog, strings.Join(args, " "), commandTimeout)
	}
	var exitErr *exec.ExitError
	code := 0
	if errors.As(err, &exitErr) {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %s: %v", prog, strings.Join(args, " "), err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

// watchAllocation kills p when guard.file grows past guard.max bytes of
// disk, and reports the size it saw on overLimit.
func watchAllocation(ctx context.Context, guard *allocGuard, p *os.Process, overLimit chan<- int64) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if n := allocated(guard.file); n > guard.max {
			overLimit <- n
			p.Kill()
			return
		}
	}
}

// allocated is the disk space a file occupies (0 when it does not exist).
func allocated(name string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(name, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// mustRun runs a reference tool that is expected to succeed (fixture
// building) and fails the test with its output otherwise.
func mustRun(t testing.TB, dir, prog string, args ...string) result {
	t.Helper()
	r := run(t, dir, prog, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\n%s%s", filepath.Base(prog), strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// differential runs the same qemu-img command line with the real
// qemu-img and with imgfs in dir and reports any difference in stdout,
// stderr or exit code. The reference runs first, so an imgfs that
// modified the image could not hide it from qemu-img.
func differential(t testing.TB, dir string, args ...string) {
	t.Helper()
	want := run(t, dir, qemuImg, args...)
	got := run(t, dir, ours, args...)
	if d := diffResults(want, got); d != "" {
		t.Errorf("qemu-img %s:\n%s", strings.Join(args, " "), d)
	}
}

// diffResults describes how got differs from want, or returns "".
func diffResults(want, got result) string {
	var b strings.Builder
	if want.code != got.code {
		fmt.Fprintf(&b, "exit code: qemu-img %d, imgfs %d\n", want.code, got.code)
	}
	for _, s := range []struct{ name, want, got string }{
		{"stdout", want.stdout, got.stdout},
		{"stderr", want.stderr, got.stderr},
	} {
		if s.want != s.got {
			fmt.Fprintf(&b, "%s differs %s\n--- qemu-img:\n%s--- imgfs:\n%s", s.name, firstDiff(s.want, s.got), s.want, s.got)
		}
	}
	return b.String()
}

// firstDiff names the first line on which a and b differ.
func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) && i < len(bl); i++ {
		if al[i] != bl[i] {
			return fmt.Sprintf("at line %d: %q vs %q", i+1, al[i], bl[i])
		}
	}
	return fmt.Sprintf("in length: %d vs %d lines", len(al), len(bl))
}

// runBothIn runs args with qemu-img and with imgfs, each in its own copy
// of the fixtures in template, and requires the same stdout, stderr and
// exit code and the same files afterwards; it returns both directories
// and those files for the caller's comparison of their contents.
func runBothIn(t *testing.T, template string, args ...string) (refDir, ourDir string, files []string) {
	t.Helper()
	refDir, ourDir = t.TempDir(), t.TempDir()
	copyDir(t, template, refDir)
	copyDir(t, template, ourDir)
	want := run(t, refDir, qemuImg, args...)
	got := run(t, ourDir, ours, args...)
	if d := diffResults(want, got); d != "" {
		t.Errorf("qemu-img %s:\n%s", strings.Join(args, " "), d)
	}
	refFiles, ourFiles := listDir(t, refDir), listDir(t, ourDir)
	if !slices.Equal(refFiles, ourFiles) {
		t.Fatalf("files afterwards: qemu-img %q, imgfs %q", refFiles, ourFiles)
	}
	return refDir, ourDir, refFiles
}
