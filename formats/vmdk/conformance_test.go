package vmdk_test

import (
	"testing"

	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw" // creates the files of new images
	_ "github.com/imgfs/imgfs/formats/vmdk"
)

// TestConformance runs the driver suite on every subformat that takes
// arbitrary writes. streamOptimized takes each grain once, whole, as in
// QEMU, so it has its own tests.
func TestConformance(t *testing.T) {
	for _, opts := range []string{
		"subformat=monolithicSparse",
		"subformat=monolithicSparse,zeroed_grain=on",
		"subformat=monolithicFlat",
		"subformat=twoGbMaxExtentSparse",
		"subformat=twoGbMaxExtentFlat",
	} {
		t.Run(opts, func(t *testing.T) {
			formatstest.Run(t, formatstest.Created("vmdk", opts))
		})
	}
}
