package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

// progressBar is qemu-img's progress report (util/qemu-progress.c).
// With -p it draws "    (NN.NN/100%)" and a carriage return on stdout,
// redrawn when the value moves by more than minSkip, at 0 and at 100,
// and a newline at the end. Without -p, SIGUSR1 asks for the value, which
// is printed once on stderr with a newline the next time the bar would
// have been redrawn, as QEMU does. The arithmetic is in float32, as
// QEMU's, so the same steps print. Safe for concurrent use.
type progressBar struct {
	stdout, stderr io.Writer
	enabled        bool
	// sigs receives SIGUSR1 while the bar exists without -p; pending is
	// set by its goroutine and consumed by print.
	sigs    chan os.Signal
	pending atomic.Bool

	mu                  sync.Mutex // guards the fields below
	minSkip, cur, shown float32
	lastDone            int64
}

// newProgressBar starts a progress report for a command whose step is
// minSkip percent; enabled is -p (and not -q). Call end when done.
func newProgressBar(c *cli.Context, enabled bool, minSkip float32) *progressBar {
	p := &progressBar{stdout: c.App.Writer, stderr: c.App.ErrWriter, enabled: enabled, minSkip: minSkip}
	if !enabled {
		sigs := make(chan os.Signal, 1) // the goroutine must not read p.sigs, which end clears
		p.sigs = sigs
		signal.Notify(sigs, syscall.SIGUSR1)
		go func() {
			for range sigs {
				p.pending.Store(true)
			}
		}()
	}
	return p
}

// print is qemu_progress_print: with max 0 delta is the new value,
// otherwise delta percent of max is added.
func (p *progressBar) print(delta float32, max int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cur := delta
	if max != 0 {
		cur = float32(p.cur + float32(delta/100)*float32(max))
	}
	cur = min(cur, 100) // qemu_progress_print caps the sum
	p.cur = cur
	if cur > float32(p.shown+p.minSkip) || cur < float32(p.shown-p.minSkip) || cur == 0 || cur == 100 {
		p.shown = cur
		switch {
		case p.enabled:
			fmt.Fprintf(p.stdout, "    (%3.2f/100%%)\r", float64(cur))
			flush(p.stdout)
		case p.pending.Swap(false):
			fmt.Fprintf(p.stderr, "    (%3.2f/100%%)\n", float64(cur))
		}
	}
}

// end is qemu_progress_end: the final newline with -p; it also stops
// listening for SIGUSR1.
func (p *progressBar) end() {
	if p.sigs != nil {
		signal.Stop(p.sigs)
		close(p.sigs)
		p.sigs = nil
	}
	if p.enabled {
		fmt.Fprint(p.stdout, "\n")
		flush(p.stdout)
	}
}

// chunks adapts the bar to an operation that reports its work done so
// far: each step adds (step/total)*100 percent, as img_compare's
// qemu_progress_print(chunk / total * 100, 100).
func (p *progressBar) chunks() control.Progress {
	return func(done, total int64) {
		p.mu.Lock()
		step := done - p.lastDone
		p.lastDone = done
		p.mu.Unlock()
		delta := float32(0) // QEMU's first call is a literal 0, also for empty images
		if step != 0 {
			delta = float32(float32(step)/float32(total)) * 100
		}
		p.print(delta, 100)
	}
}

// fraction adapts the bar to an operation whose progress is done out of
// total, as img_convert's qemu_progress_print(100.0 * done / total, 0).
func (p *progressBar) fraction() control.Progress {
	return func(done, total int64) {
		p.print(float32(100*float64(done)/float64(total)), 0)
	}
}
