package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/imgfs/imgfs/formats"
)

// Defaults of qemu-img bench.
const (
	DefaultBenchCount   = 75000
	DefaultBenchDepth   = 64
	DefaultBenchBufSize = 4096
)

// BenchOptions are the inputs of `bench` (qemu-img.c img_bench).
type BenchOptions struct {
	Image formats.Image
	// Count requests of BufSize bytes, Depth of them in flight at once.
	Count, Depth int
	BufSize      int
	// Step is how far apart consecutive requests start; 0 means BufSize.
	Step int
	// Offset is where the first request starts; offsets wrap around at
	// the image size.
	Offset int64
	// Write sends writes of Pattern bytes instead of reads.
	Write   bool
	Pattern byte
	// FlushInterval, when not 0, flushes after every that many
	// requests; with Drain the requests in flight complete first.
	FlushInterval int
	Drain         bool
	// WriteThrough flushes after every write (cache mode writethrough).
	WriteThrough bool
}

func (o *BenchOptions) step() int {
	if o.Step == 0 {
		return o.BufSize
	}
	return o.Step
}

// Header is what qemu-img prints before it starts the requests.
func (o *BenchOptions) Header() string {
	kind := "read"
	if o.Write {
		kind = "write"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %d, step size %d)\n",
		o.Count, kind, o.BufSize, o.Depth, o.Offset, o.step())
	if o.FlushInterval != 0 {
		fmt.Fprintf(&b, "Sending flush every %d requests\n", o.FlushInterval)
	}
	return b.String()
}

// BenchSummary is the line qemu-img prints when the run is over.
func BenchSummary(d time.Duration) string {
	return fmt.Sprintf("Run completed in %3.3f seconds.\n", float64(d.Microseconds())/1e6)
}

// bench is one run. Its state machine is img_bench's bench_cb: each
// completion may start a flush and then refills the queue; the requests
// themselves run in goroutines, so up to Depth of them truly overlap.
type bench struct {
	o    *BenchOptions
	size int64
	ctx  context.Context
	wg   sync.WaitGroup // every request and flush goroutine

	mu       sync.Mutex // guards the fields below
	n        int        // requests not yet completed
	inFlight int
	inFlush  bool
	offset   int64
	free     [][]byte // buffers of finished requests
	err      error
	done     chan struct{} // closed when n reaches 0 or on error
	closed   bool
}

// Bench runs the requests and returns how long they took. A failed
// request ends the run with "Failed request: ...".
func Bench(ctx context.Context, o BenchOptions) (time.Duration, error) {
	if o.Depth > 0 && o.BufSize > 0 && int64(o.Depth)*int64(o.BufSize) > math.MaxInt32 {
		// qemu-img's int arithmetic overflows here and its allocation
		// aborts; refuse instead.
		return 0, fmt.Errorf("Cannot allocate %d buffers of %d bytes", o.Depth, o.BufSize)
	}
	b := &bench{o: &o, size: o.Image.Size(), ctx: ctx, n: o.Count, offset: o.Offset, done: make(chan struct{})}
	start := time.Now()
	b.mu.Lock()
	b.advance()
	b.mu.Unlock()
	select {
	case <-b.done:
	case <-ctx.Done():
		b.fail(ctx.Err())
	}
	elapsed := time.Since(start)
	b.wg.Wait()
	return elapsed, b.err
}

// complete is bench_cb for a finished request or flush.
func (b *bench) complete(buf []byte, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if buf != nil {
		b.free = append(b.free, buf)
	}
	if err != nil {
		b.failLocked(err)
		return
	}
	if b.closed {
		return
	}
	switch {
	case b.inFlush:
		// A flush with a drained queue finished: go on.
		b.inFlush = false
	case b.inFlight > 0:
		remaining := b.n - b.inFlight
		b.n--
		b.inFlight--
		if fi := b.o.FlushInterval; fi != 0 && remaining%fi == 0 {
			if b.inFlight == 0 || !b.o.Drain {
				b.inFlush = b.o.Drain
				b.wg.Add(1)
				go b.flush()
			}
			if b.o.Drain {
				b.checkDone()
				return
			}
		}
	}
	b.advance()
}

// advance starts requests until Depth are in flight or none are left,
// and notices the end of the run. Called with mu held.
func (b *bench) advance() {
	for b.n > b.inFlight && b.inFlight < b.o.Depth {
		off := b.offset
		b.inFlight++
		b.offset += int64(b.o.step())
		if b.size > 0 {
			b.offset %= b.size
		}
		var buf []byte
		if k := len(b.free); k > 0 {
			buf, b.free = b.free[k-1], b.free[:k-1]
		} else {
			buf = make([]byte, b.o.BufSize)
			if b.o.Write && b.o.Pattern != 0 {
				for i := range buf {
					buf[i] = b.o.Pattern
				}
			}
		}
		b.wg.Add(1)
		go b.request(off, buf)
	}
	b.checkDone()
}

func (b *bench) checkDone() {
	if b.n == 0 && !b.closed {
		b.closed = true
		close(b.done)
	}
}

// request runs one read or write; requests outside the image fail with
// EIO, as the block layer's request check makes them.
func (b *bench) request(off int64, buf []byte) {
	defer b.wg.Done()
	var err error
	switch n := int64(len(buf)); {
	case off > b.size || n > b.size-off:
		err = syscall.EIO
	case b.o.Write:
		if _, err = b.o.Image.WriteAt(buf, off); err == nil && b.o.WriteThrough {
			err = b.o.Image.Flush()
		}
	default:
		var k int
		if k, err = b.o.Image.ReadAt(buf, off); errors.Is(err, io.EOF) && k == len(buf) {
			err = nil
		}
	}
	if err != nil {
		err = ioErrorf(err, "Failed request")
	}
	b.complete(buf, err)
}

func (b *bench) flush() {
	defer b.wg.Done()
	if err := b.o.Image.Flush(); err != nil {
		b.fail(ioErrorf(err, "Failed flush request"))
		return
	}
	if b.o.Drain {
		b.complete(nil, nil)
	}
}

func (b *bench) fail(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failLocked(err)
}

func (b *bench) failLocked(err error) {
	if b.err == nil {
		b.err = err
	}
	if !b.closed {
		b.closed = true
		close(b.done)
	}
}
