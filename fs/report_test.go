package fs

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	_ "github.com/imgfs/imgfs/formats/qcow2"
)

// TestRenderCheckCanceled: a check whose request was interrupted (the
// kernel sends INTERRUPT when the reader gets a signal, Go's preemption
// signal included) must fail as canceled, not become a report saying
// "Check failed: context canceled" that the check file then keeps.
func TestRenderCheckCanceled(t *testing.T) {
	name := filepath.Join(t.TempDir(), "t.qcow2")
	d := formats.Lookup("qcow2")
	o := formats.NewOptions(d.CreateSpecs())
	o.Set("size", "1048576")
	if err := d.Create(name, o); err != nil {
		t.Fatal(err)
	}
	img, err := formats.Open(name, formats.OpenOptions{ReadOnly: true, Check: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if text, err := renderCheck(context.Background(), img, name); err != nil || len(text) == 0 {
		t.Fatalf("check of a new image: %q, %v", text, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := renderCheck(ctx, img, name); !errors.Is(err, context.Canceled) {
		t.Errorf("check with a canceled request: %v, want context.Canceled", err)
	}
}
