package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strconv"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// Limits and defaults of qemu-img convert (qemu-img.c).
const (
	// DefaultSparseSize is -S's default: 4 KiB of zeroes make a hole.
	DefaultSparseSize = 4096
	// MaxSparseSize is the largest -S, qemu-img's MAX_BUF_SECTORS.
	MaxSparseSize = 32768 * sectorSize
	// DefaultWorkers and MaxWorkers bound -m (qemu's coroutines).
	DefaultWorkers = 8
	MaxWorkers     = 16
	// copyBufSize is how much data one worker copies at a time
	// (IO_BUF_SIZE).
	copyBufSize = 2 << 20
	// maxStatusRequest is the longest block-status query
	// (BDRV_REQUEST_MAX_SECTORS): empty images are walked in steps of
	// just under 2 GiB.
	maxStatusRequest = (1<<31 - 1) &^ (sectorSize - 1)
)

// CacheMode is a -t/-T cache mode as bdrv_parse_cache_mode reads it.
type CacheMode struct {
	// Direct bypasses the host page cache (O_DIRECT).
	Direct bool
	// WriteThrough flushes after every write.
	WriteThrough bool
	// NoFlush skips flushing to disk entirely ("unsafe").
	NoFlush bool
}

// ParseCacheMode reads one of QEMU's cache mode names.
func ParseCacheMode(mode string) (CacheMode, bool) {
	switch mode {
	case "none", "off":
		return CacheMode{Direct: true}, true
	case "directsync":
		return CacheMode{Direct: true, WriteThrough: true}, true
	case "writeback":
		return CacheMode{}, true
	case "writethrough":
		return CacheMode{WriteThrough: true}, true
	case "unsafe":
		return CacheMode{NoFlush: true}, true
	}
	return CacheMode{}, false
}

// ConvertOptions are the inputs of `convert` (qemu-img.c img_convert).
type ConvertOptions struct {
	// Sources are the open source images; the target is their
	// concatenation. The caller closes them.
	Sources []formats.Image
	// Target is the output file name.
	Target string
	// TargetFormat is -O; "" means raw.
	TargetFormat string
	// Options is the -o list, several -o joined by ','.
	Options string
	// Secrets holds the --object secrets by id, for options that name
	// one (luks' key-secret).
	Secrets map[string][]byte
	// SkipCreate is -n: the target exists and OpenTarget opens it.
	SkipCreate bool
	// OpenTarget opens the target once it exists, in the target's cache
	// mode. nil opens Target with TargetFormat.
	OpenTarget func(cache CacheMode) (formats.Image, error)
	// BackingFile and BackingFormat are -B and -F: the target gets a
	// backing file, and only what the top source image allocates is
	// copied.
	BackingFile, BackingFormat string
	// Compressed is -c.
	Compressed bool
	// SparseSize is -S in bytes (a multiple of 512): a run of at least
	// this many zero bytes in data is left a hole. 0 writes everything.
	SparseSize int64
	// Workers is -m, the number of requests in flight.
	Workers int
	// OutOfOrder is -W: writes may complete out of order.
	OutOfOrder bool
	// CopyWhole is -C: data ranges are copied whole, without zero
	// detection, as QEMU's copy offloading does.
	CopyWhole bool
	// TargetIsZero is --target-is-zero: with -n, zero ranges are not
	// written.
	TargetIsZero bool
	// Salvage is --salvage: unreadable sectors become zeroes, with a
	// warning, instead of failing the conversion.
	Salvage bool
	// RateLimit is -r in bytes per second; 0 means unlimited.
	RateLimit int64
	// TargetCache is -t; "" means "unsafe", convert's default.
	TargetCache string
	// Progress receives bytes done out of the bytes that will be written.
	Progress Progress
	// Warn receives warnings (salvaged read errors); nil drops them.
	Warn func(msg string)
}

// ExitZeroError is an error qemu-img reports and then exits 0 with, as
// img_convert does for one of its checks; scripts may depend on it.
type ExitZeroError struct{ Err error }

func (e *ExitZeroError) Error() string { return e.Err.Error() }
func (e *ExitZeroError) Unwrap() error { return e.Err }

// Convert copies the sources into a new (or, with SkipCreate, existing)
// target image, as img_convert does: the sources' block status splits
// the target into data, zero and backing-file chunks; workers read and
// prepare data chunks (zero detection, compression) in parallel and
// write them in order unless OutOfOrder; zero chunks cost nothing on a
// new image. Errors read like qemu-img's.
func Convert(ctx context.Context, o ConvertOptions) error {
	c, err := newConverter(&o)
	if err != nil {
		return err
	}
	target, err := c.openTarget()
	if err != nil {
		return err
	}
	c.target = target
	err = c.setup()
	if err == nil {
		err = c.run(ctx)
	}
	if err == nil && !c.cache.NoFlush {
		err = target.Flush()
	}
	if cerr := target.Close(); err == nil {
		err = cerr
	}
	return err
}

// blockKind is what a range of the target gets (qemu-img's
// ImgConvertBlockStatus).
type blockKind int

const (
	kindData    blockKind = iota // copy the source's bytes
	kindZero                     // the range reads as zeroes
	kindBacking                  // leave it to the target's backing file
)

// converter is one running conversion (qemu-img's ImgConvertState).
type converter struct {
	o      *ConvertOptions
	format string          // the target's
	driver *formats.Driver // nil with SkipCreate
	create *formats.Options
	cache  CacheMode
	target formats.Image

	// srcStart is each source's offset in the target; srcEnd the end of
	// its sector-rounded span. srcAlign is the unit block status runs
	// are cut to (the source's cluster size, at least a sector).
	srcStart, srcEnd, srcAlign []int64
	total                      int64

	targetHasBacking bool
	// targetBackingEnd is where the target's backing image ends, past
	// which zeroes need not be written; -1 when unknown or none.
	targetBackingEnd int64
	hasZeroInit      bool
	minSparse        int64 // sectors
	alignment        int64 // sectors; zero runs are cut to it
	bufSize          int64
	compressor       formats.CompressedWriter // non-nil with -c
	cluster          int64                    // compression unit

	mu sync.Mutex // guards everything below
	// next is the first byte not yet handed to a worker.
	next int64
	// status is the kind of [.., statusEnd), cached from the last block
	// status query.
	status    blockKind
	statusEnd int64
	// wrOff is where the next in-order write starts; cond signals its
	// moves and failures.
	wrOff       int64
	cond        *sync.Cond
	err         error
	done, alloc int64        // progress, in bytes
	limit       *rateLimiter // -r
}

func newConverter(o *ConvertOptions) (*converter, error) {
	c := &converter{o: o, targetBackingEnd: -1, minSparse: o.SparseSize / sectorSize}
	c.cond = sync.NewCond(&c.mu)
	for _, src := range o.Sources {
		c.srcStart = append(c.srcStart, c.total)
		c.total += roundUp(src.Size(), sectorSize)
		c.srcEnd = append(c.srcEnd, c.total)
		align := int64(sectorSize)
		if d, ok := src.(formats.Describer); ok {
			if desc, err := d.Describe(); err == nil && desc.ClusterSize > align {
				align = desc.ClusterSize
			}
		}
		c.srcAlign = append(c.srcAlign, align)
	}
	format := o.TargetFormat
	if format == "" {
		format = "raw"
	}
	c.format = format
	if !o.SkipCreate {
		if c.driver = formats.Lookup(format); c.driver == nil {
			return nil, formats.Errorf(ErrInvalidArgument, "Unknown file format '%s'", format)
		}
		if c.driver.Create == nil || c.driver.ReadOnly {
			return nil, formats.Errorf(formats.ErrUnsupported, "Format driver '%s' does not support image creation", format)
		}
		c.create = formats.NewOptions(c.driver.CreateSpecs())
		c.create.Secrets = o.Secrets
		if err := c.create.Parse(o.Options); err != nil {
			return nil, err
		}
		if err := c.create.Set("size", strconv.FormatInt(c.total, 10)); err != nil {
			return nil, err
		}
		if err := setBacking(c.create, format, o.BackingFile, false, o.BackingFormat); err != nil {
			return nil, err
		}
	}
	backing := o.BackingFile
	backingOpt := c.create != nil && c.create.Has("backing_file")
	if backingOpt {
		backing = c.create.String("backing_file")
	}
	c.targetHasBacking = backing != ""
	switch {
	case o.TargetIsZero && c.targetHasBacking:
		// qemu-img 7.2 reports this but forgets to fail.
		return nil, &ExitZeroError{errors.New("Cannot use --target-is-zero when the destination image has a backing file")}
	case len(o.Sources) > 1 && c.targetHasBacking:
		return nil, formats.Errorf(ErrInvalidArgument, "Having a backing file for the target makes no sense when concatenating multiple input images")
	case backingOpt && !c.create.Has("backing_fmt"):
		return nil, formats.Errorf(ErrInvalidArgument, "Use of backing file requires explicit backing format")
	}
	if o.Compressed {
		switch {
		case c.driver != nil && !c.driver.CanCompress:
			return nil, formats.Errorf(formats.ErrUnsupported, "Compression not supported for this file format")
		case c.create != nil && (c.create.Bool("encryption") || c.create.String("encrypt.format") != ""):
			return nil, formats.Errorf(formats.ErrUnsupported, "Compression and encryption not supported at the same time")
		case c.create != nil && c.create.String("preallocation") != "" && c.create.String("preallocation") != "off":
			return nil, formats.Errorf(formats.ErrUnsupported, "Compression and preallocation not supported at the same time")
		}
	}
	return c, nil
}

// openTarget creates the target (unless -n) and opens it.
func (c *converter) openTarget() (formats.Image, error) {
	o := c.o
	if !o.SkipCreate {
		// Unlike create, convert reports the driver's own error for
		// oversized images (it calls bdrv_create, not bdrv_img_create).
		if err := c.driver.Create(o.Target, c.create); err != nil {
			return nil, fmt.Errorf("%s: error while converting %s: %w", o.Target, c.driver.Name, err)
		}
	}
	mode := o.TargetCache
	if mode == "" {
		mode = "unsafe"
	}
	var ok bool
	if c.cache, ok = ParseCacheMode(mode); !ok {
		return nil, formats.Errorf(ErrInvalidArgument, "Invalid cache option: %s", mode)
	}
	if o.OpenTarget != nil {
		return o.OpenTarget(c.cache)
	}
	img, err := formats.Open(o.Target, formats.OpenOptions{Format: c.format, Direct: c.cache.Direct, NoFlush: c.cache.NoFlush})
	if err != nil {
		return nil, fmt.Errorf("Could not open '%s': %w", o.Target, err)
	}
	return img, nil
}

// setup checks the open target and derives the copy parameters.
func (c *converter) setup() error {
	o := c.o
	compressed := o.Compressed
	if co, ok := c.target.(formats.CompressedOnly); ok && co.NeedsCompressedWrites() {
		// QEMU: s.compressed = s.compressed || bdi.needs_compressed_writes.
		compressed = true
	}
	if compressed {
		cw, ok := c.target.(formats.CompressedWriter)
		if !ok {
			return errors.New("Compression not supported for this file format")
		}
		c.compressor, c.cluster = cw, cw.CompressionUnit()
	}
	if o.SkipCreate && c.target.Size() < c.total {
		return errors.New("output file is smaller than input file")
	}
	if c.targetHasBacking && !o.SkipCreate {
		if b, ok := c.target.(formats.Backed); ok && b.Backing() != nil {
			c.targetBackingEnd = roundUp(b.Backing().Size(), sectorSize)
		}
	}
	// A new image reads as zeroes, so zero ranges need no writes, unless
	// a backing file would show through or -S 0 asks for allocation.
	c.hasZeroInit = o.TargetIsZero || !o.SkipCreate && c.minSparse != 0 && !c.targetHasBacking && hasZeroInit(c.target)
	c.bufSize = copyBufSize
	if compressed {
		if c.cluster <= 0 || c.cluster > MaxSparseSize || c.cluster%sectorSize != 0 {
			return errors.New("invalid cluster size")
		}
		c.bufSize = c.cluster
	}
	// Zero runs are cut at multiples of the sparse size so writes stay
	// aligned (is_allocated_sectors' alignment).
	c.alignment = 1
	for c.alignment*2 <= c.minSparse {
		c.alignment *= 2
	}
	return nil
}

// run counts the bytes to write, for progress, then copies with the
// workers.
func (c *converter) run(ctx context.Context) error {
	for off := int64(0); off < c.total; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, kind, err := c.iterate(off)
		if err != nil {
			return err
		}
		if kind == kindData || c.minSparse == 0 && kind == kindZero {
			c.alloc += n
		}
		off += n
	}
	c.statusEnd = 0

	workers := c.o.Workers
	if workers <= 0 {
		workers = DefaultWorkers
	}
	if c.compressor != nil {
		// Compression is CPU-bound: use every core whatever -m says.
		workers = max(workers, runtime.GOMAXPROCS(0))
	}
	stop := context.AfterFunc(ctx, func() { c.fail(ctx.Err()) })
	defer stop()
	c.limit = newRateLimiter(c.o.RateLimit)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.worker()
		}()
	}
	wg.Wait()
	return c.err
}

// fail records the first error and wakes the workers waiting for their
// turn to write, so that they stop.
func (c *converter) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.cond.Broadcast()
	c.mu.Unlock()
}

// op is one write a chunk turns into.
type op struct {
	off, n int64
	kind   blockKind
	data   []byte // kindData: the bytes (compressed ones when compressed)
	// compressed: data is a compressed cluster for WriteCompressed.
	compressed bool
	// offload: a -C data chunk copied host file to host file, without
	// data; it falls back to a copy through memory.
	offload bool
}

// worker takes chunks in order, reads and prepares them in parallel with
// the other workers, and writes them in order unless -W.
func (c *converter) worker() {
	buf := make([]byte, c.bufSize)
	var cbuf []byte
	if c.compressor != nil {
		// Room for what incompressible data grows by (stored deflate
		// blocks) and a format's framing, so that Compress need not
		// allocate.
		cbuf = make([]byte, c.cluster+c.cluster/16+64)
	}
	var ops []op
	for {
		c.mu.Lock()
		if c.err != nil || c.next >= c.total {
			c.mu.Unlock()
			return
		}
		off := c.next
		n, kind, err := c.iterate(off)
		if err != nil {
			c.err = err
			c.cond.Broadcast()
			c.mu.Unlock()
			return
		}
		if c.minSparse == 0 && kind == kindZero {
			n = min(n, c.bufSize)
		}
		c.next += n
		if kind == kindData || c.minSparse == 0 && kind == kindZero {
			c.done += n
			c.o.Progress.report(c.done, c.alloc)
		}
		c.mu.Unlock()

		// Only data chunks are bounded by the buffer size; zero and
		// backing chunks carry no bytes.
		var chunk []byte
		switch {
		case kind == kindData && c.offloadable(off, n):
			ops = append(ops[:0], op{off: off, n: n, kind: kindData, offload: true})
		case kind == kindData:
			chunk = buf[:n]
			if err := c.read(off, chunk); err != nil {
				c.fail(ioErrorf(err, "error while reading at byte %d", off))
				return
			}
		case c.minSparse == 0 && kind == kindZero:
			chunk = buf[:n]
			clear(chunk)
			kind = kindData
		}
		if kind != kindData || chunk != nil {
			ops = c.prepare(ops[:0], off, n, kind, chunk, cbuf)
		}

		if !c.o.OutOfOrder {
			c.mu.Lock()
			for c.wrOff != off && c.err == nil {
				c.cond.Wait()
			}
			failed := c.err != nil
			c.mu.Unlock()
			if failed {
				return
			}
		}
		for _, w := range ops {
			if err := c.write(w, buf); err != nil {
				c.fail(ioErrorf(err, "error while writing at byte %d", w.off))
				return
			}
		}
		if !c.o.OutOfOrder {
			c.mu.Lock()
			c.wrOff = off + n
			c.cond.Broadcast()
			c.mu.Unlock()
		}
	}
}

// iterate returns the length and kind of the next chunk at off
// (convert_iteration_sectors). Called with mu held, or before the
// workers start.
func (c *converter) iterate(off int64) (int64, blockKind, error) {
	i := c.part(off)
	n := min(c.total-off, maxStatusRequest)
	postBackingZero := false
	if c.targetBackingEnd >= 0 {
		if off >= c.targetBackingEnd {
			postBackingZero = true
		} else if off+n > c.targetBackingEnd {
			// Zeroes are handled differently past the backing file's end.
			n = c.targetBackingEnd - off
		}
	}
	if c.statusEnd <= off {
		local := off - c.srcStart[i]
		count, kind, err := c.blockStatus(i, local, n)
		if err != nil {
			return 0, 0, err
		}
		n = roundUp(count, sectorSize)
		// Keep runs aligned to the source's clusters, so reads do not
		// split them.
		if tail := (local + n) % c.srcAlign[i]; n > tail {
			n -= tail
		}
		if kind == kindZero && postBackingZero {
			kind = kindBacking
		}
		c.status, c.statusEnd = kind, off+n
	}
	n = min(n, c.statusEnd-off)
	if c.status == kindData {
		n = min(n, c.bufSize)
	}
	if c.compressor != nil {
		// Compressed clusters are written whole: a short run of another
		// kind inside a cluster makes the whole cluster data.
		if n < c.cluster {
			n = min(c.cluster, c.total-off)
			c.status = kindData
		} else {
			n -= n % c.cluster
		}
	}
	return n, c.status, nil
}

// part is the index of the source holding target offset off.
func (c *converter) part(off int64) int {
	for i, end := range c.srcEnd {
		if off < end {
			return i
		}
	}
	return len(c.srcEnd) - 1
}

// blockStatus classifies [local, local+n) of source i and returns how
// many bytes share the kind. With a target backing file only the top
// source image counts: what it does not allocate stays with the backing
// file. With --salvage, a failing query is retried on shorter ranges and
// finally treated as data.
func (c *converter) blockStatus(i int, local, n int64) (int64, blockKind, error) {
	src := c.o.Sources[i]
	for {
		length := min(n, src.Size()-local)
		count, kind, err := c.classify(src, local, length)
		if err == nil {
			return max(count, 1), kind, nil
		}
		if !c.o.Salvage {
			return 0, 0, ioErrorf(err, "error while reading block status at offset %d", local)
		}
		if n <= sectorSize {
			c.warn(ioErrorf(err, "error while reading block status at offset %d", local).Error())
			return sectorSize, kindData, nil
		}
		n = roundUp((n+3)/4, sectorSize)
	}
}

func (c *converter) classify(src formats.Image, off, length int64) (int64, blockKind, error) {
	if !c.targetHasBacking {
		e, err := formats.ChainStatus(src, off, length)
		if err != nil {
			return 0, 0, err
		}
		if e.Status&formats.StatusZero != 0 {
			return e.Length, kindZero, nil
		}
		return e.Length, kindData, nil
	}
	e, err := src.BlockStatus(off, length)
	if err != nil {
		return 0, 0, err
	}
	switch {
	case e.Status&formats.StatusZero != 0:
		return e.Length, kindZero, nil
	case e.Status&formats.StatusData != 0:
		return e.Length, kindData, nil
	}
	// Unallocated: the backing file shows through, except past its end
	// (or without one), where the range reads as zeroes.
	var backing formats.Image
	if b, ok := src.(formats.Backed); ok {
		backing = b.Backing()
	}
	if backing == nil || off >= backing.Size() {
		return e.Length, kindZero, nil
	}
	return e.Length, kindBacking, nil
}

// read fills buf with the target's bytes at off, from one or more
// sources; bytes past a source's end (up to its sector-rounded size)
// are zeroes.
func (c *converter) read(off int64, buf []byte) error {
	for len(buf) > 0 {
		i := c.part(off)
		src := c.o.Sources[i]
		local := off - c.srcStart[i]
		n := min(int64(len(buf)), c.srcEnd[i]-off)
		data := min(n, max(src.Size()-local, 0))
		if err := c.readSource(src, local, buf[:data]); err != nil {
			return err
		}
		clear(buf[data:n])
		buf, off = buf[n:], off+n
	}
	return nil
}

func (c *converter) readSource(src formats.Image, off int64, buf []byte) error {
	err := readFull(src, off, buf)
	if err == nil || !c.o.Salvage {
		return err
	}
	// Salvage sector by sector; what cannot be read becomes zeroes.
	for p := int64(0); p < int64(len(buf)); p += sectorSize {
		s := buf[p:min(p+sectorSize, int64(len(buf)))]
		if err := readFull(src, off+p, s); err != nil {
			c.warn(ioErrorf(err, "error while reading offset %d", off+p).Error())
			clear(s)
		}
	}
	return nil
}

// readFull reads len(buf) bytes at off; a short read at the image's end
// is not an error.
func readFull(img formats.Image, off int64, buf []byte) error {
	n, err := img.ReadAt(buf, off)
	if err == io.EOF && n == len(buf) {
		err = nil
	}
	return err
}

func (c *converter) warn(msg string) {
	if c.o.Warn != nil {
		c.o.Warn(msg)
	}
}

// prepare turns a chunk into writes: zero detection for data (runs of at
// least the sparse size become zero writes), compression with -c.
func (c *converter) prepare(ops []op, off, n int64, kind blockKind, chunk, cbuf []byte) []op {
	switch {
	case kind != kindData:
		return append(ops, op{off: off, n: n, kind: kind})
	case c.compressor != nil:
		// With -S 0 even zero clusters are stored (compressed).
		if c.minSparse != 0 && formats.IsZero(chunk) {
			return append(ops, op{off: off, n: n, kind: kindZero})
		}
		src := chunk
		if int64(len(src)) < c.cluster {
			// The image's last cluster is short: pad it, as QEMU does.
			src = make([]byte, c.cluster)
			copy(src, chunk)
		}
		if out, ok := c.compressor.Compress(cbuf, src); ok {
			return append(ops, op{off: off, n: n, kind: kindData, data: out, compressed: true})
		}
		return append(ops, op{off: off, n: n, kind: kindData, data: chunk})
	case c.minSparse == 0 || c.o.CopyWhole:
		return append(ops, op{off: off, n: n, kind: kindData, data: chunk})
	}
	sector := off / sectorSize
	for p := int64(0); p < n; {
		allocated, k := allocatedSectorsMin(chunk[p:], (n-p)/sectorSize, c.minSparse, sector, c.alignment)
		kind := kindZero
		if allocated {
			kind = kindData
		}
		ops = append(ops, op{off: off + p, n: k * sectorSize, kind: kind, data: chunk[p : p+k*sectorSize]})
		p += k * sectorSize
		sector += k
	}
	return ops
}

// write performs one op on the target (convert_co_write). scratch is the
// worker's buffer, free once the op's data is prepared.
func (c *converter) write(w op, scratch []byte) error {
	var err error
	switch {
	case w.kind == kindBacking:
		return nil
	case w.kind == kindZero:
		if c.hasZeroInit {
			return nil
		}
		c.limit.wait(w.n)
		err = writeZeroes(c.target, w.off, w.n)
	case w.compressed:
		c.limit.wait(int64(len(w.data)))
		err = c.compressor.WriteCompressed(w.off, w.data)
	case w.offload:
		c.limit.wait(w.n)
		if c.copyRange(w.off, w.n) != nil {
			// The kernel could not (another filesystem, a short file):
			// copy through memory, as QEMU falls back from copy_range.
			if err = c.read(w.off, scratch[:w.n]); err == nil {
				_, err = c.target.WriteAt(scratch[:w.n], w.off)
			}
		}
	default:
		c.limit.wait(int64(len(w.data)))
		_, err = c.target.WriteAt(w.data, w.off)
	}
	if err == nil && c.cache.WriteThrough {
		err = c.target.Flush()
	}
	return err
}

// writeZeroes zeroes [off, off+n) of img, with the driver's efficient
// zero write when it has one, else by writing the zeroed scratch buffer
// repeatedly.
func writeZeroes(img formats.Image, off, n int64) error {
	if z, ok := img.(formats.Zeroer); ok {
		return z.WriteZeroes(off, n, true)
	}
	// zeroChunk is only ever read: a worker's own buffer may still hold
	// data the chunk's later writes need.
	for n > 0 {
		k := min(n, int64(len(zeroChunk)))
		if _, err := img.WriteAt(zeroChunk[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// zeroChunk is written where a target cannot write zeroes itself.
var zeroChunk = make([]byte, 1<<20)

// offloadable reports whether -C can copy [off, off+n) from one host
// file to the other without the data passing through us: both the
// source and the target map it onto host files.
func (c *converter) offloadable(off, n int64) bool {
	if !c.o.CopyWhole || c.compressor != nil {
		return false
	}
	i := c.part(off)
	if off+n > c.srcEnd[i] {
		return false
	}
	src, ok1 := c.o.Sources[i].(formats.HostMapper)
	dst, ok2 := c.target.(formats.HostMapper)
	if !ok1 || !ok2 {
		return false
	}
	_, _, _, ok1 = src.HostMap(off-c.srcStart[i], n)
	_, _, _, ok2 = dst.HostMap(off, n)
	return ok1 && ok2
}

// copyRange copies [off, off+n) with copy_file_range, piece by piece
// as the two host mappings allow.
func (c *converter) copyRange(off, n int64) error {
	i := c.part(off)
	src := c.o.Sources[i].(formats.HostMapper)
	dst := c.target.(formats.HostMapper)
	for n > 0 {
		sf, soff, sl, ok1 := src.HostMap(off-c.srcStart[i], n)
		df, doff, dl, ok2 := dst.HostMap(off, n)
		if !ok1 || !ok2 {
			return formats.ErrUnsupported
		}
		k := min(sl, dl)
		if err := sf.CopyRangeTo(df, soff, doff, k); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// allocatedSectors reports whether the first sector of buf (n sectors)
// holds data, and how many sectors from there share that state. The end
// of a run is moved to an alignment boundary (in sectors, a power of two)
// when that keeps writes aligned (qemu-img's is_allocated_sectors).
func allocatedSectors(buf []byte, n, sector, alignment int64) (bool, int64) {
	if n <= 0 {
		return false, 0
	}
	zero := formats.IsZero(buf[:sectorSize])
	i := int64(1)
	for ; i < n; i++ {
		if formats.IsZero(buf[i*sectorSize:(i+1)*sectorSize]) != zero {
			break
		}
	}
	if i == n {
		return !zero, i
	}
	if tail := (sector + i) & (alignment - 1); tail != 0 {
		if zero && i <= tail {
			// Data follows within the same aligned block, which will be
			// written anyway: write the zeroes with it.
			zero = false
		}
		if !zero {
			i = min(i+alignment-tail, n)
		} else {
			i -= tail
		}
	}
	return !zero, i
}

// allocatedSectorsMin is allocatedSectors, except that when buf starts
// with data, zero runs shorter than min sectors count as data, so small
// holes do not split writes (is_allocated_sectors_min).
func allocatedSectorsMin(buf []byte, n, minimum, sector, alignment int64) (bool, int64) {
	minimum = min(minimum, n)
	allocated, pnum := allocatedSectors(buf, n, sector, alignment)
	if !allocated {
		return false, pnum
	}
	used, checked := pnum, pnum
	for rest := n - pnum; rest > 0; {
		a, k := allocatedSectors(buf[checked*sectorSize:], rest, sector+checked, alignment)
		checked += k
		rest -= k
		if a {
			used = checked
		} else if k >= minimum {
			break
		}
	}
	return true, used
}

// ioError is a failed read or write as qemu-img reports it: what failed
// and the errno text (strerror), EIO for errors that carry no errno,
// as QEMU's drivers return -EIO. Unwrap gives the cause.
type ioError struct {
	msg string
	err error
}

func ioErrorf(err error, format string, args ...any) *ioError {
	text := formats.ErrnoError{Err: syscall.EIO}.Error()
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		text = formats.ErrnoError{Err: errno}.Error()
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		text = formats.ErrnoError{Err: syscall.ECANCELED}.Error()
	}
	return &ioError{msg: fmt.Sprintf(format, args...) + ": " + text, err: err}
}

func (e *ioError) Error() string { return e.msg }
func (e *ioError) Unwrap() error { return e.err }

func roundUp(n, unit int64) int64 { return (n + unit - 1) / unit * unit }

// hasZeroInit reports whether a new img reads as zeroes.
func hasZeroInit(img formats.Image) bool {
	z, ok := img.(formats.ZeroInitReporter)
	return !ok || z.HasZeroInit()
}
