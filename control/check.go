package control

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// ErrCheckUnsupported: the image's format has no consistency check
// (qemu-img check exits 63).
var ErrCheckUnsupported = errors.New("This image format does not support checks")

// CheckOptions are the inputs of `qemu-img check`.
type CheckOptions struct {
	Image formats.Image
	// Filename is the name the user gave, which the report repeats.
	Filename string
	Mode     formats.CheckMode
	// Report receives the per-cluster messages ("Leaked cluster ...")
	// that qemu-img prints on stderr.
	Report func(msg string)
}

// CheckReport is QAPI's ImageCheck plus what img_check prints about a
// repair.
type CheckReport struct {
	Filename string
	Format   string
	formats.CheckResult
	// Repaired is set when the first pass fixed something; the counters
	// then come from the second, read-only pass and LeaksFixed and
	// CorruptionsFixed from the first.
	Repaired bool
}

// Check runs the image's check as img_check does: when a repair fixed
// anything, the image is checked again and that second result is
// reported, with the counts of what was fixed. When that second pass
// fails, the error comes with the report of the first, whose
// RepairSummary is still shown.
func Check(ctx context.Context, o CheckOptions) (*CheckReport, error) {
	c, ok := o.Image.(formats.Checker)
	if !ok {
		return nil, ErrCheckUnsupported
	}
	report := o.Report
	if report == nil {
		report = func(string) {}
	}
	res, err := c.Check(ctx, o.Mode, report)
	if errors.Is(err, formats.ErrUnsupported) {
		return nil, ErrCheckUnsupported
	}
	if err != nil {
		return nil, err
	}
	r := &CheckReport{Filename: o.Filename, Format: o.Image.Format(), CheckResult: *res}
	if res.CorruptionsFixed != 0 || res.LeaksFixed != 0 {
		r.Repaired = true
		second, err := c.Check(ctx, formats.CheckReadOnly, report)
		if err != nil {
			// qemu-img has printed the repair summary by then.
			return r, err
		}
		second.LeaksFixed, second.CorruptionsFixed = res.LeaksFixed, res.CorruptionsFixed
		r.CheckResult = *second
	}
	return r, nil
}

// Object is the report as QAPI's ImageCheck: zero counters are left out,
// except check-errors.
func (r *CheckReport) Object() formats.Object {
	o := formats.Object{
		{Key: "filename", Value: r.Filename},
		{Key: "format", Value: r.Format},
		{Key: "check-errors", Value: r.CheckErrors},
	}
	for _, m := range []formats.Member{
		{Key: "image-end-offset", Value: r.ImageEndOffset},
		{Key: "corruptions", Value: r.Corruptions},
		{Key: "leaks", Value: r.Leaks},
		{Key: "corruptions-fixed", Value: r.CorruptionsFixed},
		{Key: "leaks-fixed", Value: r.LeaksFixed},
		{Key: "total-clusters", Value: r.TotalClusters},
		{Key: "allocated-clusters", Value: r.AllocatedClusters},
		{Key: "fragmented-clusters", Value: r.FragmentedClusters},
		{Key: "compressed-clusters", Value: r.CompressedClusters},
	} {
		if m.Value.(int64) != 0 {
			o = append(o, m)
		}
	}
	return o
}

// JSON renders the report as `check --output=json`.
func (r *CheckReport) JSON() string { return MarshalQJSON(r.Object()) + "\n" }

// Human renders the report as img_check's human output, including the
// repair summary that precedes the second pass.
func (r *CheckReport) Human() string {
	var b strings.Builder
	b.WriteString(r.RepairSummary())
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		b.WriteString("No errors were found on the image.\n")
	} else {
		if r.Corruptions != 0 {
			fmt.Fprintf(&b, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks != 0 {
			fmt.Fprintf(&b, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors != 0 {
			fmt.Fprintf(&b, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(&b, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(&b, "Image end offset: %d\n", r.ImageEndOffset)
	}
	return b.String()
}

// RepairSummary is what the human output says before the second pass of
// a repair ("" when nothing was repaired).
func (r *CheckReport) RepairSummary() string {
	if !r.Repaired {
		return ""
	}
	return fmt.Sprintf("The following inconsistencies were found and repaired:\n\n"+
		"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
		r.LeaksFixed, r.CorruptionsFixed)
}

// ExitCode is img_check's exit status for a completed check: 1 when the
// check itself had errors, 2 for corruption, 3 for leaks only, else 0.
// (63, check unsupported, is ErrCheckUnsupported.)
func (r *CheckReport) ExitCode() int {
	switch {
	case r.CheckErrors != 0:
		return 1
	case r.Corruptions != 0:
		return 2
	case r.Leaks != 0:
		return 3
	}
	return 0
}
