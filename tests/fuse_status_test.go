package tests

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestFUSEStatusProgress watches status while a rate-limited commit
// runs through ctl: it must show the operation running with partial
// progress, then done at 100% once the write(2) returned.
func TestFUSEStatusProgress(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	runSteps(t, src, []step{
		create("base.qcow2", "8M", ""),
		overlay("top.qcow2", "base.qcow2", "qcow2", ""),
		qemuIO("qcow2", "top.qcow2", "write -P 0xab 0 6M"),
	})
	want := convertRaw(t, src, "top.qcow2")
	mnt := mountImgfs(t, src)
	a := filepath.Join(mnt, "top.qcow2")
	// 6 MiB at 4 MiB/s: about a second and a half.
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- writeCtlErr(filepath.Join(a, "ctl"), "commit -r 4M") }()
	var running []ctlStatus
	for finished := false; !finished; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("ctl commit: %v", err)
			}
			finished = true
		case <-time.After(20 * time.Millisecond):
			// Not readStatus: its st_size check races with the
			// progress, whose text grows from 9.99 to 10.00.
			b, err := os.ReadFile(filepath.Join(a, "status"))
			if err != nil {
				t.Fatal(err)
			}
			var s ctlStatus
			if err := json.Unmarshal(b, &s); err != nil {
				t.Fatalf("status %q: %v", b, err)
			}
			if s.State == "running" {
				running = append(running, s)
			}
		}
	}
	t.Logf("commit took %v; status read %d times while it ran", time.Since(start), len(running))
	partial := false
	for i, s := range running {
		if s.Operation != "commit" || s.Error != "" {
			t.Errorf("status while running: %+v", s)
		}
		if i > 0 && s.Progress < running[i-1].Progress {
			t.Errorf("progress went back from %.2f to %.2f", running[i-1].Progress, s.Progress)
		}
		partial = partial || s.Progress > 0 && s.Progress < 100
	}
	if !partial {
		t.Errorf("status never showed the commit part way through: %+v", running)
	}
	if s := readStatus(t, a); s.Operation != "commit" || s.State != "done" || s.Progress != 100 || s.Error != "" {
		t.Errorf("status after the commit: %+v", s)
	}
	if got := convertRaw(t, src, "base.qcow2"); !bytes.Equal(got, want) {
		t.Error("base.qcow2 after the commit differs from top.qcow2 before it")
	}
}
