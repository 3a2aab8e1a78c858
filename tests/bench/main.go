// Command bench measures imgfs beside its peers in one run, as issue 6
// asks: `imgfs convert` against `qemu-img convert` 7.2, and the imgfs
// FUSE mount against qemu-storage-daemon 7.2's FUSE export (QSD) and a
// loop mount of the raw file. It prints a Markdown report on stdout:
// the machine, the workload, a table of medians with the ratio
// imgfs/peer and the target for each, a second table of CPU
// time, peak RSS and output sizes, and every run's numbers. Progress
// goes to stderr.
//
// Usage, as root (it drops the page cache, makes loop devices and
// mounts), from the checkout:
//
//	make bench [BENCHFLAGS='-runs 5 -only fuse/']
//	go run ./tests/bench [-work DIR] [-runs N] [-only REGEXP] [-size SIZE] [-fio-runtime DURATION]
//
// It installs what is missing with scripts/install-bench-deps.sh (fio,
// e2fsprogs, qemu-utils, fuse3, and qemu-storage-daemon extracted from
// Debian's qemu-system-common into WORK/cache, not installed), builds
// imgfs into WORK, and makes the workload once, with qemu-img, under
// WORK/workload-vN-SIZE, where later runs find it: a raw disk of SIZE
// (default 4G) holding an ext4 filesystem filled to about half with
// files copied from /usr, its qcow2, deflate and zstd compressed qcow2,
// vmdk and vhdx forms, a tarball of SIZE/4 of files for the write
// scenario, and 16 TiB qcow2s, empty and with 10,000 scattered clusters.
//
// Scenarios (-only matches their names): convert/* and convert-c/*
// (same command line for both, plus -W -m 16), fuse/seqread,
// fuse/randread (fio; cold, and beyond the issue with the image file
// in the host's page cache), fuse/tar, fuse/write, sparse/empty and
// sparse/scattered (cold and warm). Each runs -runs times, the sides alternating and
// taking turns to go first. What makes the comparison fair:
//
//   - Every measured run of every side starts after sync and
//     drop_caches, and FUSE runs on a freshly started server, so both
//     start cold and neither pays for the writeback of an earlier run.
//     On a VM that gives free memory back to its host (free page
//     reporting), the run waits until the memory freed is given back,
//     so that every run pays the same for the pages it touches.
//   - Outputs are removed between runs. Neither qemu-img convert nor
//     imgfs convert syncs its output at the end, so neither is timed
//     with a sync; the FUSE write scenario ends with sync for both.
//   - Peak RSS is the child's rusage maximum (wait4), as /usr/bin/time
//     -v reports it; a FUSE server's is its VmHWM before it stops.
//   - Run 1's imgfs convert output must compare identical to its source
//     (and check clean), the FUSE-written image must check clean, and the
//     tar of every side must have the same size: a fast wrong answer
//     fails the scenario instead of winning it.
//
// The machine is shared and the numbers are wall-clock times: compare
// ratios from one run, not times across runs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	work := flag.String("work", "/var/tmp/imgfs-bench", "directory for the tools, the cached workload and the outputs")
	runs := flag.Int("runs", 3, "measured runs of each side of each scenario")
	only := flag.String("only", "", "run only the scenarios whose name matches this regular expression")
	size := flag.String("size", "4G", "size of the raw disk (K, M, G suffixes); its files fill half of it, the write scenario's tarball a quarter")
	fioRuntime := flag.Duration("fio-runtime", 10*time.Second, "how long each fio random-read run lasts")
	flag.Parse()
	if err := mainErr(*work, *runs, *only, *size, *fioRuntime); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func mainErr(work string, runs int, only, sizeFlag string, fioRuntime time.Duration) error {
	start := time.Now()
	if os.Geteuid() != 0 {
		return fmt.Errorf("must run as root: it drops the page cache and makes loop devices and mounts")
	}
	if runs < 1 {
		return fmt.Errorf("-runs %d: need at least 1", runs)
	}
	onlyRE, err := regexp.Compile(only)
	if err != nil {
		return fmt.Errorf("-only: %w", err)
	}
	size, err := parseSize(sizeFlag)
	if err != nil {
		return err
	}
	if work, err = filepath.Abs(work); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	repo, err := findRepo()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	cleanStale(work)
	t, err := setupTools(ctx, repo, work)
	if err != nil {
		return err
	}
	machine := machineInfo(ctx, repo, t)
	w, err := prepareWorkload(ctx, t, work, size)
	if err != nil {
		return err
	}
	scratch := filepath.Join(work, "scratch")
	os.RemoveAll(scratch)
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	b := &bench{ctx: ctx, t: t, w: w, scratch: scratch, fioRuntime: fioRuntime}

	var done []*scenario
	results := map[*scenario]map[string][]sample{}
	errs := map[*scenario]string{}
	for _, s := range b.scenarios() {
		if !onlyRE.MatchString(s.name) {
			continue
		}
		done = append(done, s)
		results[s] = map[string][]sample{}
		if err := runScenario(s, runs, results[s]); err != nil {
			errs[s] = err.Error()
			fmt.Fprintf(os.Stderr, "bench: %s: %v\n", s.name, err)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted")
		}
	}
	if len(done) == 0 {
		return fmt.Errorf("-only %q matches no scenario", only)
	}
	machine = append(machine, "load average at end: "+loadAvg())
	report(os.Stdout, machine, w, runs, done, results, errs, time.Since(start))
	return nil
}

// runScenario runs every side runs times, alternating, and stops at the
// first failure.
func runScenario(s *scenario, runs int, results map[string][]sample) error {
	for r := range runs {
		order := slices.Clone(s.sides)
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, sd := range order {
			smp, err := sd.run(r)
			if err != nil {
				return fmt.Errorf("%s, run %d: %w", sd.name, r+1, err)
			}
			results[sd.name] = append(results[sd.name], smp)
			fmt.Fprintf(os.Stderr, "bench: %s run %d/%d %s: %s\n", s.name, r+1, runs, sd.name, formatSample(smp))
		}
	}
	return nil
}

func formatSample(smp sample) string {
	keys := make([]string, 0, len(smp))
	for k := range smp {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var parts []string
	for _, k := range keys {
		format := "%s=%.4g"
		if smp[k] >= 1e6 {
			format = "%s=%.0f"
		}
		parts = append(parts, fmt.Sprintf(format, k, smp[k]))
	}
	return strings.Join(parts, " ")
}

// parseSize reads a byte count with an optional K, M, G or T suffix
// (powers of 1024).
func parseSize(s string) (int64, error) {
	shift := 0
	num := strings.TrimSuffix(strings.ToUpper(s), "B")
	if num != "" {
		if i := strings.IndexByte("KMGT", num[len(num)-1]); i >= 0 {
			shift = 10 * (i + 1)
			num = num[:len(num)-1]
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)>>shift {
		return 0, fmt.Errorf("-size %q: want a positive number of bytes with an optional K, M, G or T suffix", s)
	}
	size := n << shift
	if size < 64<<20 || size%(1<<20) != 0 {
		return 0, fmt.Errorf("-size %q: want a whole number of MiB, at least 64M", s)
	}
	return size, nil
}

// formatSize writes a size as parseSize reads it, with the largest
// exact suffix.
func formatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.suffix)
		}
	}
	return fmt.Sprint(n)
}
