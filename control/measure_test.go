package control

import (
	"testing"

	"github.com/imgfs/imgfs/formats"
)

func TestMeasureErrors(t *testing.T) {
	for _, tc := range []struct {
		o    MeasureOptions
		want string
	}{
		{MeasureOptions{Format: "bogus", Size: 1}, "Unknown file format 'bogus'"},
		{MeasureOptions{Format: "memtest", Size: 1, Options: "nope=1"},
			"Invalid parameter 'nope'\nInvalid options for file format 'memtest'"},
		{MeasureOptions{Format: "memtest", Size: 1}, "Block driver 'memtest' does not support size measurement"},
	} {
		_, err := Measure(tc.o)
		if err == nil || err.Error() != tc.want {
			t.Errorf("%+v: error %v, want %q", tc.o, err, tc.want)
		}
	}
}

func TestMeasureReport(t *testing.T) {
	for _, tc := range []struct {
		r           formats.MeasureResult
		human, json string
	}{
		{
			formats.MeasureResult{Required: 393216, FullyAllocated: 1074135040},
			"required size: 393216\nfully allocated size: 1074135040\n",
			"{\n    \"required\": 393216,\n    \"fully-allocated\": 1074135040\n}\n",
		},
		{
			formats.MeasureResult{Required: 524288, FullyAllocated: 4521984, HasBitmaps: true},
			"required size: 524288\nfully allocated size: 4521984\nbitmaps size: 0\n",
			"{\n    \"bitmaps\": 0,\n    \"required\": 524288,\n    \"fully-allocated\": 4521984\n}\n",
		},
	} {
		r := &MeasureReport{tc.r}
		if got := r.Human(); got != tc.human {
			t.Errorf("Human() = %q, want %q", got, tc.human)
		}
		if got := r.JSON(); got != tc.json {
			t.Errorf("JSON() = %q, want %q", got, tc.json)
		}
	}
}
