package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// tools are the programs the scenarios run.
type tools struct {
	imgfs   string // built from the checkout
	qemuImg string
	qemuIO  string
	qsd     string // qemu-storage-daemon, extracted by install-bench-deps.sh
}

// findRepo walks up from the working directory to the module's root.
func findRepo() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(mod, []byte("module github.com/imgfs/imgfs\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run bench inside the imgfs checkout (no go.mod of github.com/imgfs/imgfs above the working directory)")
		}
		dir = parent
	}
}

// setupTools installs what is missing, extracts qemu-storage-daemon into
// cache and builds imgfs into work.
func setupTools(ctx context.Context, repo, work string) (*tools, error) {
	script := exec.CommandContext(ctx, filepath.Join(repo, "scripts", "install-bench-deps.sh"), filepath.Join(work, "cache"))
	script.Stderr = os.Stderr
	out, err := script.Output()
	if err != nil {
		return nil, fmt.Errorf("install-bench-deps.sh: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	t := &tools{imgfs: filepath.Join(work, "imgfs"), qsd: lines[len(lines)-1]}
	for _, p := range []struct {
		dst  *string
		name string
	}{{&t.qemuImg, "qemu-img"}, {&t.qemuIO, "qemu-io"}} {
		if *p.dst, err = exec.LookPath(p.name); err != nil {
			return nil, err
		}
	}
	build := exec.CommandContext(ctx, "go", "build", "-o", t.imgfs, "./cmd/imgfs")
	build.Dir, build.Stdout, build.Stderr = repo, os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/imgfs: %w", err)
	}
	return t, nil
}

// result is what one finished child cost.
type result struct {
	wall   time.Duration
	cpu    time.Duration // user + system
	maxRSS int64         // bytes, from wait4's rusage as /usr/bin/time -v reports it
}

// measure runs cmd to the end. Its stdout goes to /dev/null unless the
// caller set it; its stderr is kept for the error message.
func measure(cmd *exec.Cmd) (result, error) {
	var stderr bytes.Buffer
	if cmd.Stderr == nil {
		cmd.Stderr = &stderr
	}
	start := time.Now()
	err := cmd.Run()
	r := result{wall: time.Since(start)}
	if cmd.ProcessState != nil {
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			r.maxRSS = ru.Maxrss * 1024
			r.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
	}
	if err != nil {
		line := strings.Join(cmd.Args, " ")
		if len(line) > 200 {
			line = line[:200] + "..."
		}
		return r, fmt.Errorf("%s: %w: %s", line, err, lastLines(stderr.String(), 5))
	}
	return r, nil
}

// run runs a command whose cost does not matter.
func run(ctx context.Context, name string, args ...string) error {
	_, err := measure(exec.CommandContext(ctx, name, args...))
	return err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}

// dropCaches writes back dirty data and empties the page cache, so that
// every measured run of either side starts from the same cold state and
// pays nothing for the writeback of the run before it.
func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		return err
	}
	settleFreeMemory()
	return nil
}

// reportedKiB counts the free memory a VM's balloon driver has given
// back to the host (free page reporting); it is absent elsewhere.
const reportedKiB = "/sys/module/page_reporting/parameters/reported_kib"

// settleFreeMemory waits, on a VM that reports free pages to its host,
// until the memory drop_caches freed has gone back to the host: the
// count stands still for 3 s (the driver reports in bursts a couple of
// seconds apart), at most 30 s. Each page a program then touches costs
// a host page fault, three to six times a guest page allocation (4 GiB:
// 4-8.6 s against 1.4 s); a run that starts before the reporting is done
// gets some of its pages cheap, how many depending on the timing, which
// made single runs of the same convert vary between 1.2 and 7 s.
// Settled, every run of every side starts from the same state.
func settleFreeMemory() {
	last, err := os.ReadFile(reportedKiB)
	if err != nil {
		return
	}
	still := time.Now()
	for start := time.Now(); time.Since(start) < 30*time.Second && time.Since(still) < 3*time.Second; {
		time.Sleep(250 * time.Millisecond)
		cur, err := os.ReadFile(reportedKiB)
		if err != nil {
			return
		}
		if !bytes.Equal(cur, last) {
			last, still = cur, time.Now()
		}
	}
}

// machineInfo describes the machine and the peers' versions for the
// report.
func machineInfo(ctx context.Context, repo string, t *tools) []string {
	var uts unix.Utsname
	unix.Uname(&uts)
	first := func(name string, args ...string) string {
		out, err := exec.CommandContext(ctx, name, args...).Output()
		if err != nil {
			return "unknown (" + err.Error() + ")"
		}
		return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
	}
	mem := "unknown"
	if kb := procField("/proc/meminfo", "MemTotal"); kb != "" {
		var n int64
		fmt.Sscanf(kb, "%d", &n)
		mem = fmt.Sprintf("%.1f GiB", float64(n)/(1<<20))
	}
	return []string{
		fmt.Sprintf("nproc: %d", runtime.NumCPU()),
		"CPU: " + procField("/proc/cpuinfo", "model name"),
		"RAM: " + mem,
		"kernel: " + unix.ByteSliceToString(uts.Release[:]),
		"qemu-img: " + first(t.qemuImg, "--version"),
		"qemu-storage-daemon: " + first(t.qsd, "--version"),
		"imgfs: " + first("git", "-C", repo, "describe", "--always", "--dirty") + " (" + runtime.Version() + ")",
		"load average at start: " + loadAvg(),
	}
}

// procField returns the value of the first "name: value" line of a
// /proc file, "" when there is none.
func procField(path, name string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == name {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
