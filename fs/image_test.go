package fs

import (
	"testing"
	"time"
)

// TestWaitClosed: close(2) of disk returns before the server sees the
// RELEASE, so commit and rebase wait a moment for the image to close; an
// image that stays open is still refused.
func TestWaitClosed(t *testing.T) {
	d := &imageDir{img: &memImage{}}
	d.mu.Lock()
	go func() {
		time.Sleep(20 * time.Millisecond)
		d.mu.Lock()
		d.img = nil
		d.mu.Unlock()
	}()
	if !d.waitClosedLocked() {
		t.Error("the image closed 20 ms later was reported open")
	}
	d.img = &memImage{}
	start := time.Now()
	if d.waitClosedLocked() {
		t.Error("an image that stays open was reported closed")
	}
	if waited := time.Since(start); waited < releaseWait {
		t.Errorf("gave up after %v, want %v", waited, releaseWait)
	}
	d.mu.Unlock()
}
