package control

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// TestCheckRepair follows `qemu-img check -r leaks` on an image with two
// leaked clusters; the texts are qemu-img 7.2's.
func TestCheckRepair(t *testing.T) {
	var modes []formats.CheckMode
	img := checkedStub{&stubImage{data: make([]byte, 64<<20), check: func(mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
		modes = append(modes, mode)
		r := &formats.CheckResult{TotalClusters: 1024, AllocatedClusters: 2, ImageEndOffset: 458752}
		if len(modes) == 1 {
			r.Leaks, r.LeaksFixed, r.ImageEndOffset = 2, 2, 655360
		}
		return r, nil
	}}}
	rep, err := Check(context.Background(), CheckOptions{Image: img, Filename: "leak.qcow2", Mode: formats.CheckFixLeaks})
	if err != nil {
		t.Fatal(err)
	}
	if len(modes) != 2 || modes[0] != formats.CheckFixLeaks || modes[1] != formats.CheckReadOnly {
		t.Errorf("check passes %v, want fix then read-only", modes)
	}
	human := `The following inconsistencies were found and repaired:

    2 leaked clusters
    0 corruptions

Double checking the fixed image now...
No errors were found on the image.
2/1024 = 0.20% allocated, 0.00% fragmented, 0.00% compressed clusters
Image end offset: 458752
`
	if got := rep.Human(); got != human {
		t.Errorf("human:\n%s\nwant\n%s", got, human)
	}
	json := `{
    "image-end-offset": 458752,
    "total-clusters": 1024,
    "check-errors": 0,
    "leaks-fixed": 2,
    "allocated-clusters": 2,
    "filename": "leak.qcow2",
    "format": "stub"
}
`
	if got := rep.JSON(); got != json {
		t.Errorf("json:\n%s\nwant\n%s", got, json)
	}
	if rep.ExitCode() != 0 {
		t.Errorf("exit code %d, want 0", rep.ExitCode())
	}
}

func TestCheckReport(t *testing.T) {
	tests := []struct {
		name  string
		res   formats.CheckResult
		human string
		code  int
	}{
		{"leaks", formats.CheckResult{Leaks: 2, TotalClusters: 1024, AllocatedClusters: 2, ImageEndOffset: 655360},
			"\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n" +
				"2/1024 = 0.20% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 655360\n", 3},
		{"corruptions and leaks", formats.CheckResult{Corruptions: 1, Leaks: 1},
			"\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n" +
				"\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", 2},
		{"internal errors", formats.CheckResult{CheckErrors: 3, TotalClusters: 3, AllocatedClusters: 3, FragmentedClusters: 1, CompressedClusters: 2},
			"\n3 internal errors have occurred during the check.\n" +
				"3/3 = 100.00% allocated, 33.33% fragmented, 66.67% compressed clusters\n", 1},
		{"clean", formats.CheckResult{}, "No errors were found on the image.\n", 0},
	}
	for _, tc := range tests {
		rep := &CheckReport{Filename: "f", Format: "qcow2", CheckResult: tc.res}
		if got := rep.Human(); got != tc.human {
			t.Errorf("%s: human\n%q\nwant\n%q", tc.name, got, tc.human)
		}
		if got := rep.ExitCode(); got != tc.code {
			t.Errorf("%s: exit code %d, want %d", tc.name, got, tc.code)
		}
	}
}

func TestCheckUnsupported(t *testing.T) {
	_, err := Check(context.Background(), CheckOptions{Image: stubEmpty(512)})
	if !errors.Is(err, ErrCheckUnsupported) {
		t.Errorf("got %v, want ErrCheckUnsupported", err)
	}
}

// A failing second pass still leaves the repair summary to print.
func TestCheckSecondPassFails(t *testing.T) {
	calls := 0
	img := checkedStub{&stubImage{data: make([]byte, 512), check: func(formats.CheckMode, func(string)) (*formats.CheckResult, error) {
		calls++
		if calls == 2 {
			return nil, errors.New("Input/output error")
		}
		return &formats.CheckResult{CorruptionsFixed: 1}, nil
	}}}
	rep, err := Check(context.Background(), CheckOptions{Image: img, Mode: formats.CheckFixAll})
	if err == nil || rep == nil || !strings.HasPrefix(rep.RepairSummary(), "The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n") {
		t.Errorf("got %v, %v", rep, err)
	}
}
