package tests

import (
	"strings"
	"testing"
)

// TestConvertOptions converts one source to qcow2 under each set of
// creation options, with imgfs and with qemu-img. imgfs's output must be
// clean and equal to the source, and qemu-img info must describe it as it
// describes qemu-img's own output (apart from disk usage), which shows
// the options took effect.
func TestConvertOptions(t *testing.T) {
	src := t.TempDir()
	runSteps(t, src, append(rawSource("src.raw"),
		create("src.qcow2", "4M", ""),
		qemuIO("qcow2", "src.qcow2", append(fill(64*kib, 4*mib), zeroDiscard...)...),
	))
	cases := []struct {
		name string
		args []string
	}{
		{"cluster-512", []string{"-o", "cluster_size=512"}},
		{"cluster-2M", []string{"-o", "cluster_size=2M"}},
		{"compat-0.10", []string{"-o", "compat=0.10"}},
		{"extended-l2", []string{"-o", "extended_l2=on"}},
		{"lazy-refcounts", []string{"-o", "lazy_refcounts=on"}},
		{"refcount-bits-1", []string{"-o", "refcount_bits=1"}},
		{"refcount-bits-64", []string{"-o", "refcount_bits=64"}},
		{"compressed-zstd", []string{"-c", "-o", "compression_type=zstd"}},
		{"compressed-cluster-512", []string{"-c", "-o", "cluster_size=512"}},
		{"compressed-cluster-2M", []string{"-c", "-o", "cluster_size=2M"}},
		{"compressed-compat-0.10", []string{"-c", "-o", "compat=0.10"}},
	}
	for _, c := range cases {
		for _, source := range []struct{ file, format string }{{"src.raw", "raw"}, {"src.qcow2", "qcow2"}} {
			t.Run(c.name+"_from_"+source.format, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				copyDir(t, src, dir)
				args := append([]string{"-f", source.format, "-O", "qcow2"}, c.args...)
				want := mustRun(t, dir, qemuImg, append(append([]string{"convert"}, args...), source.file, "ref.qcow2")...)
				got := convertOurs(t, dir, append(args, source.file, "ours.qcow2")...)
				if d := diffResults(want, got); d != "" {
					t.Fatalf("convert %s:\n%s", strings.Join(args, " "), d)
				}
				if r := run(t, dir, qemuImg, "check", "ours.qcow2"); r.code != 0 {
					t.Errorf("qemu-img check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
				}
				if r := run(t, dir, qemuImg, "compare", "-f", source.format, "-F", "qcow2", source.file, "ours.qcow2"); r.code != 0 {
					t.Errorf("qemu-img compare: exit %d\n%s%s", r.code, r.stdout, r.stderr)
				}
				// Same name in both descriptions, so only the image differs.
				w := describeCreated(t, dir, "ref.qcow2")
				g := strings.ReplaceAll(describeCreated(t, dir, "ours.qcow2"), "ours.qcow2", "ref.qcow2")
				if w != g {
					t.Errorf("qemu-img info of the outputs differs:\n--- qemu-img's:\n%s--- imgfs's:\n%s", w, g)
				}
				if w, g := compressedClusters(t, dir, "ref.qcow2"), compressedClusters(t, dir, "ours.qcow2"); w != g {
					t.Errorf("imgfs wrote %d compressed clusters, qemu-img %d", g, w)
				}
			})
		}
	}
}
