package control

import (
	"sync"
	"time"
)

// rateLimiter spaces out work so that it averages at most a given
// number of bytes per second (qemu's -r). Safe for concurrent use; a
// nil limiter does not limit.
type rateLimiter struct {
	perSec int64
	start  time.Time

	mu   sync.Mutex // guards sent
	sent int64
}

func newRateLimiter(perSec int64) *rateLimiter {
	if perSec <= 0 {
		return nil
	}
	return &rateLimiter{perSec: perSec, start: time.Now()}
}

// wait sleeps until n more bytes fit the rate.
func (r *rateLimiter) wait(n int64) {
	if r == nil {
		return
	}
	r.mu.Lock()
	r.sent += n
	due := r.start.Add(time.Duration(float64(r.sent) / float64(r.perSec) * float64(time.Second)))
	r.mu.Unlock()
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}
