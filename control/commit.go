package control

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/imgfs/imgfs/formats"
)

// commitWorkers is how many chunks commit copies at once, and
// commitChunk the most bytes one of them moves (the mirror job's
// buffer).
const (
	commitWorkers = DefaultWorkers
	commitChunk   = copyBufSize
)

// CommitOptions are the inputs of `commit` (qemu-img.c img_commit).
type CommitOptions struct {
	// Top is the image to commit, open read-write with its backing chain
	// as qemu-img opens it, so that open errors read the same. Commit
	// closes it.
	Top formats.Image
	// Filename is the name the user gave, which messages repeat.
	Filename string
	// ReopenTop opens the top image again, read-write and without its
	// backing chain.
	ReopenTop func() (formats.Image, error)
	// Base is -b: the backing file to commit into, named as a backing
	// file reference (relative names are taken relative to each image
	// of the chain). "" is the top's own backing file.
	Base string
	// Drop is -d (and implied by -b): the top image keeps its data.
	Drop bool
	// RateLimit is -r in bytes per second; 0 means unlimited.
	RateLimit int64
	// Cache is -t, for the images commit writes.
	Cache CacheMode
	// Progress receives bytes copied out of the bytes to copy.
	Progress Progress
}

// Commit copies everything the images above the base allocate down into
// the base, as qemu-img's commit job does, then empties the top image
// unless Drop. The base grows to the top's size when it is smaller.
// Intermediate images and the top's backing reference stay as they are.
//
// The top's chain holds the base open read-only, and that read-only open
// forbids writers (QEMU's lock protocol, formats/lock.go), so the base
// cannot simply be opened again for writing next to it. QEMU reopens the
// node read-write; imgfs has no reopen, so Commit records the chain
// (file names and formats), closes it, and opens it again assembled from
// separate opens: the top read-write without backing, the images in
// between read-only without backing, the base read-write with its own
// backing chain (which its zero writes must see). Every range is then
// read from the layer that allocates it, so no layer needs its backing.
func Commit(ctx context.Context, o CommitOptions) (err error) {
	chain := backingChain(o.Top)
	bi := 1
	if o.Base != "" {
		bi = findBackingImage(chain, o.Base)
		if bi < 0 {
			o.Top.Close()
			return formats.Errorf(ErrInvalidArgument, "Did not find '%s' in the backing chain of '%s'", o.Base, o.Filename)
		}
	} else if len(chain) < 2 {
		o.Top.Close()
		return formats.Errorf(ErrInvalidArgument, "Image does not have a backing file")
	}
	type layerRef struct{ name, format string }
	refs := make([]layerRef, bi+1)
	for i := range refs {
		refs[i] = layerRef{chain[i].Filename(), chain[i].Format()}
	}
	if err := o.Top.Close(); err != nil {
		return err
	}

	var layers []formats.Image // top first; the base is not among them
	defer func() {
		for _, l := range layers {
			if cerr := l.Close(); err == nil {
				err = cerr
			}
		}
	}()
	top, err := o.ReopenTop()
	if err != nil {
		return err
	}
	layers = append(layers, top)
	for _, r := range refs[1:bi] {
		img, err := formats.Open(r.name, formats.OpenOptions{Format: r.format, ReadOnly: true, NoBacking: true, Direct: o.Cache.Direct})
		if err != nil {
			return fmt.Errorf("Could not open '%s': %w", r.name, err)
		}
		layers = append(layers, img)
	}
	base, err := formats.Open(refs[bi].name, formats.OpenOptions{Format: refs[bi].format, Direct: o.Cache.Direct})
	if err != nil {
		return fmt.Errorf("Could not open '%s': %w", refs[bi].name, err)
	}
	defer func() {
		if cerr := base.Close(); err == nil {
			err = cerr
		}
	}()

	if size := top.Size(); base.Size() < size {
		r, ok := base.(formats.Resizer)
		if !ok {
			return fmt.Errorf("Could not resize '%s': %w", refs[bi].name, formats.ErrUnsupported)
		}
		if err := r.Resize(size, "off", false); err != nil {
			return err
		}
	}
	c := &committer{layers: layers, base: base, o: &o, limit: newRateLimiter(o.RateLimit)}
	if err := c.run(ctx); err != nil {
		return err
	}
	// The copied data must be durable before the top lets go of it.
	if !o.Cache.NoFlush {
		if err := base.Flush(); err != nil {
			return err
		}
	}
	if o.Drop {
		return nil
	}
	// Formats that cannot be emptied keep their data, as QEMU ignores
	// ENOTSUP from bdrv_make_empty.
	if e, ok := top.(formats.Emptier); ok {
		if err := e.MakeEmpty(); err != nil {
			return fmt.Errorf("Could not empty %s: %w", o.Filename, err)
		}
	}
	return nil
}

// backingChain lists img and its open backing images, top first.
func backingChain(img formats.Image) []formats.Image {
	var chain []formats.Image
	for img != nil {
		chain = append(chain, img)
		b, ok := img.(formats.Backed)
		if !ok {
			break
		}
		img = b.Backing()
	}
	return chain
}

// findBackingImage returns the index in chain of the image name refers
// to, or -1, as bdrv_find_backing_image: for each image with a backing
// file, name is resolved relative to that image and both it and the
// stored reference are canonicalised (realpath) before comparing, so
// names that do not exist match nothing. Protocol names compare as
// written.
func findBackingImage(chain []formats.Image, name string) int {
	for i, img := range chain[:len(chain)-1] {
		b, ok := img.(formats.Backed)
		if !ok {
			return -1
		}
		stored, _ := b.BackingInfo()
		full := formats.BackingPath(img.Filename(), stored)
		if hasProtocol(name) || hasProtocol(stored) {
			if name == stored || name == full {
				return i + 1
			}
			continue
		}
		want, err1 := realPath(formats.BackingPath(img.Filename(), name))
		have, err2 := realPath(full)
		if err1 == nil && err2 == nil && want == have {
			return i + 1
		}
	}
	return -1
}

// hasProtocol is path_has_protocol: "proto:..." before any slash.
func hasProtocol(name string) bool {
	for i := 0; i < len(name); i++ {
		switch name[i] {
		case ':':
			return true
		case '/':
			return false
		}
	}
	return false
}

// realPath is realpath(3): absolute, symlinks resolved, must exist.
func realPath(name string) (string, error) {
	abs, err := filepath.Abs(name)
	if err != nil {
		return "", err
	}
	p, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", err
	}
	_, err = os.Stat(p)
	return p, err
}

// allocatedAbove is bdrv_is_allocated_above without the base: it
// reports whether some image of layers (top first) allocates
// [off, off+n), for how many bytes from off that holds, which layer
// decides and with which status. A layer that ends before off decides
// with zeroes: what lies below it no longer shows through.
func allocatedAbove(layers []formats.Image, off, n int64) (length int64, depth int, st formats.Status, err error) {
	for i, l := range layers {
		if off >= l.Size() {
			return n, i, formats.StatusZero, nil
		}
		e, err := l.BlockStatus(off, n)
		if err != nil {
			return 0, 0, 0, err
		}
		if e.Length <= 0 {
			return 0, 0, 0, fmt.Errorf("%s: empty block status at %d: %w", l.Filename(), off, formats.ErrCorrupt)
		}
		if e.Status.Allocated() {
			return e.Length, i, e.Status, nil
		}
		n = e.Length
	}
	return n, -1, 0, nil
}

// committer is one running commit.
type committer struct {
	layers []formats.Image
	base   formats.Image
	o      *CommitOptions
	limit  *rateLimiter

	mu    sync.Mutex // guards done and err
	done  int64
	total int64
	err   error
}

// commitJob is a range one layer decides: copied from that layer, or
// zeroed in the base.
type commitJob struct {
	off, n int64
	layer  formats.Image
	zero   bool
}

// run counts the bytes to copy, for progress, then copies them with
// the workers.
func (c *committer) run(ctx context.Context) error {
	if err := c.walk(ctx, func(j commitJob) error { c.total += j.n; return nil }); err != nil {
		return err
	}
	if c.total == 0 {
		return nil
	}
	c.o.Progress.report(0, c.total)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan commitJob)
	var wg sync.WaitGroup
	for range commitWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, commitChunk)
			for j := range jobs {
				if err := c.copy(j, buf); err != nil {
					c.fail(err)
					cancel()
				}
			}
		}()
	}
	werr := c.walk(ctx, func(j commitJob) error {
		select {
		case jobs <- j:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	close(jobs)
	wg.Wait()
	if c.err != nil {
		return c.err
	}
	return werr
}

// walk hands every range allocated above the base to fn, in chunks of
// at most commitChunk bytes.
func (c *committer) walk(ctx context.Context, fn func(commitJob) error) error {
	size := c.layers[0].Size()
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, depth, st, err := allocatedAbove(c.layers, off, min(size-off, maxStatusRequest))
		if err != nil {
			return ioErrorf(err, "error while reading block status at offset %d", off)
		}
		if depth >= 0 {
			for p := off; p < off+n; p += commitChunk {
				j := commitJob{off: p, n: min(commitChunk, off+n-p), layer: c.layers[depth], zero: st&formats.StatusZero != 0}
				if err := fn(j); err != nil {
					return err
				}
			}
		}
		off += n
	}
	return nil
}

// copy moves one chunk into the base.
func (c *committer) copy(j commitJob, buf []byte) error {
	c.limit.wait(j.n)
	if j.zero {
		if err := writeZeroes(c.base, j.off, j.n); err != nil {
			return ioErrorf(err, "error while writing at byte %d", j.off)
		}
	} else {
		b := buf[:j.n]
		if err := readFull(j.layer, j.off, b); err != nil {
			return ioErrorf(err, "error while reading at byte %d", j.off)
		}
		if _, err := c.base.WriteAt(b, j.off); err != nil {
			return ioErrorf(err, "error while writing at byte %d", j.off)
		}
	}
	if c.o.Cache.WriteThrough {
		if err := c.base.Flush(); err != nil {
			return err
		}
	}
	c.mu.Lock()
	c.done += j.n
	c.o.Progress.report(c.done, c.total)
	c.mu.Unlock()
	return nil
}

func (c *committer) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}
