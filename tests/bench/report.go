package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
)

// report prints the Markdown report.
func report(out io.Writer, machine []string, w *workload, runs int, scenarios []*scenario,
	results map[*scenario]map[string][]sample, errs map[*scenario]string, took time.Duration) {
	p := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	p("# imgfs bench")
	p("")
	p("## Machine")
	p("")
	for _, m := range machine {
		p("- %s", m)
	}
	p("")
	p("## Workload")
	p("")
	p("- %s raw disk: ext4 holding %d files, %s (copied from %s)", formatSize(w.size), w.files,
		formatValue(byteCount, float64(w.fileBytes)), strings.Join(fileRoots, ", "))
	for _, f := range []struct{ what, path string }{
		{"qcow2", w.qcow2}, {"deflate qcow2", w.deflate}, {"zstd qcow2", w.zstd}, {"vmdk", w.vmdk}, {"vhdx", w.vhdx},
		{"tarball for fuse/write", w.tarball}, {"16 TiB qcow2 with 10,000 scattered clusters", w.scattered},
	} {
		if st, err := os.Stat(f.path); err == nil {
			p("- %s: %s", f.what, formatValue(byteCount, float64(st.Size())))
		}
	}
	p("")
	p("## Results")
	p("")
	p("Medians of %d runs per side. ratio = imgfs / peer: for times lower is better, for MB/s and IOPS higher is better.", runs)
	p("")
	table(out, scenarios, results, errs, false)
	p("")
	p("## CPU time, memory and output size")
	p("")
	p("CPU time and peak RSS of a convert are the process's (wait4 rusage); a FUSE server's peak RSS is its VmHWM.")
	p("")
	table(out, scenarios, results, errs, true)
	p("")
	p("## Notes")
	p("")
	for _, s := range scenarios {
		if e, ok := errs[s]; ok {
			p("- **%s failed**: %s", s.name, e)
		}
		for _, n := range s.notes {
			p("- %s: %s", s.name, n)
		}
	}
	p("")
	p("## Every run")
	p("")
	for _, s := range scenarios {
		for _, sd := range s.sides {
			smps := results[s][sd.name]
			if len(smps) == 0 {
				continue
			}
			var parts []string
			for _, smp := range smps {
				parts = append(parts, formatSample(smp))
			}
			p("- %s, %s: %s", s.name, sd.name, strings.Join(parts, "; "))
		}
	}
	p("")
	p("The whole bench took %v.", took.Round(time.Second))
}

// table prints the rows of every scenario, the detail rows or the
// others.
func table(out io.Writer, scenarios []*scenario, results map[*scenario]map[string][]sample, errs map[*scenario]string, detail bool) {
	fmt.Fprintln(out, "| scenario | imgfs median | peer median | ratio | target | met? |")
	fmt.Fprintln(out, "|---|---:|---:|---:|---|---|")
	for _, s := range scenarios {
		for _, r := range s.rows {
			if r.detail != detail {
				continue
			}
			name := s.name
			if r.label != "" {
				name += " " + r.label
			}
			name += " (vs " + r.peer + ")"
			i, iok := median(results[s][sideImgfs], r.metric)
			p, pok := median(results[s][r.peer], r.metric)
			if !iok || !pok {
				why := "no result"
				if _, failed := errs[s]; failed {
					why = "failed, see notes"
				}
				fmt.Fprintf(out, "| %s | %s | | | %s | — |\n", name, why, r.target.text)
				continue
			}
			ratio := "—"
			if p != 0 {
				ratio = fmt.Sprintf("%.2f", i/p)
			}
			met := "—"
			if r.target.met != nil {
				met = "no"
				if r.target.met(i, p) {
					met = "yes"
				}
			}
			fmt.Fprintf(out, "| %s | %s | %s | %s | %s | %s |\n", name, formatValue(r.unit, i), formatValue(r.unit, p), ratio, r.target.text, met)
		}
	}
}

// median of one metric over the runs, false when no run measured it.
func median(smps []sample, metric string) (float64, bool) {
	var v []float64
	for _, smp := range smps {
		if x, ok := smp[metric]; ok {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return 0, false
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2], true
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2, true
}

func formatValue(u unit, v float64) string {
	switch u {
	case seconds:
		if v < 1 {
			return fmt.Sprintf("%.3f s", v)
		}
		return fmt.Sprintf("%.2f s", v)
	case mbPerSec:
		return fmt.Sprintf("%.0f MB/s", v)
	case perSec:
		return fmt.Sprintf("%.0f", v)
	}
	if v >= 1<<30 {
		return fmt.Sprintf("%.2f GiB", v/(1<<30))
	}
	return fmt.Sprintf("%.1f MiB", v/(1<<20))
}
