package qcow2

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/imgfs/imgfs/formats"
	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// deflateWindow is the window QEMU's zlib streams use (window bits -12):
// QEMU cannot read streams that refer further back.
const deflateWindow = 4096

// Compressors and decompressors are kept for reuse; each is reset per
// cluster.
var (
	deflateWriters = formats.NewFreeList(0, func() *flate.Writer {
		w, err := flate.NewWriterWindow(io.Discard, deflateWindow)
		if err != nil {
			panic(err) // deflateWindow is a valid constant window
		}
		return w
	})
	deflateReaders = formats.NewFreeList(0, func() io.ReadCloser { return flate.NewReader(bytes.NewReader(nil)) })
	zstdReaders    = formats.NewFreeList(0, func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(64<<20))
		if err != nil {
			panic(err) // the options are valid constants
		}
		return d
	})
	// One zstd encoder at its fastest level, able to run on every core
	// at once: EncodeAll runs at most WithEncoderConcurrency encodes at a
	// time. On the files of a Debian /usr, in 64 KiB clusters, the
	// fastest level's output is 6 % larger than QEMU's libzstd default
	// (level 3) and takes 0.75x the CPU time of the library's default
	// level (1 % larger than QEMU's). Entropy-coding literals of blocks
	// without matches takes another 0.7 % off for no measurable time.
	zstdEncoder = sync.OnceValues(func() (*zstd.Encoder, error) {
		return zstd.NewWriter(nil, zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)),
			zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithAllLitEntropyCompression(true),
			zstd.WithEncoderCRC(false))
	})
)

// sliceWriter appends to a byte slice without growing it past its cap,
// so compression stops as soon as the output would not be smaller.
type sliceWriter struct {
	buf []byte
	max int
}

var errTooBig = fmt.Errorf("compressed data not smaller than the input")

func (w *sliceWriter) Write(p []byte) (int, error) {
	if len(w.buf)+len(p) > w.max {
		return 0, errTooBig
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// CompressionUnit is the cluster size: Compress takes whole clusters.
func (img *Image) CompressionUnit() int64 { return img.lay.ClusterSize }

// Compress compresses one cluster (zero-padded when src is the short
// last cluster) with the image's compression type. It returns ok=false
// when the result would not be smaller than a cluster (QEMU then writes
// the cluster uncompressed). Safe for concurrent use.
func (img *Image) Compress(dst, src []byte) ([]byte, bool) {
	cs := int(img.lay.ClusterSize)
	if len(src) < cs {
		padded := make([]byte, cs)
		copy(padded, src)
		src = padded
	}
	if img.hdr.CompressionType == CompressionZstd {
		enc, err := zstdEncoder()
		if err != nil {
			return nil, false
		}
		out := enc.EncodeAll(src, dst[:0])
		return out, len(out) < cs
	}
	w := deflateWriters.Get()
	defer deflateWriters.Put(w)
	sw := &sliceWriter{buf: dst[:0], max: cs - 1}
	w.Reset(sw)
	if _, err := w.Write(src); err != nil {
		return nil, false
	}
	if err := w.Close(); err != nil {
		return nil, false
	}
	return sw.buf, true
}

// decompress inflates one compressed cluster from src into out, which
// must come out exactly full; bytes after the stream are ignored, as they
// may belong to the next compressed cluster.
func (img *Image) decompress(out, src []byte) error {
	if img.hdr.CompressionType == CompressionZstd {
		d := zstdReaders.Get()
		defer zstdReaders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return err
		}
		_, err := io.ReadFull(d, out)
		return err
	}
	r := deflateReaders.Get()
	defer deflateReaders.Put(r)
	if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
		return err
	}
	_, err := io.ReadFull(r, out)
	return err
}

// readCompressed reads and inflates the compressed cluster e describes;
// guest is for the error message.
func (img *Image) readCompressed(e L2Entry, guest int64) ([]byte, error) {
	host, size := img.lay.CompressedDescriptor(e)
	src := make([]byte, size)
	if _, err := img.file.ReadAt(src, int64(host)); err != nil {
		return nil, fmt.Errorf("%s: reading compressed cluster at host offset %#x: %w", img.file.Name(), host, err)
	}
	out := make([]byte, img.lay.ClusterSize)
	if err := img.decompressAt(out, src, host, guest); err != nil {
		return nil, err
	}
	return out, nil
}

// decompressAt is decompress with the error naming the cluster.
func (img *Image) decompressAt(out, src []byte, host uint64, guest int64) error {
	if err := img.decompress(out, src); err != nil {
		return fmt.Errorf("%s: compressed cluster at host offset %#x (guest offset %#x) is unreadable (%v): %w",
			img.file.Name(), host, guest&^(img.lay.ClusterSize-1), err, formats.ErrCorrupt)
	}
	return nil
}

// compressedSpan bounds the host bytes that one read of a run of
// compressed clusters covers: about ten 64 KiB clusters of disk data.
const compressedSpan = 256 << 10

// spanBufs holds buffers of compressedSpan bytes for those reads, one
// for each of the requests convert may have in flight.
var spanBufs = formats.NewFreeList(32, func() []byte { return make([]byte, compressedSpan) })

// readCompressedRun reads guest bytes into p from the compressed cluster
// m maps at off and from the compressed clusters right after it: convert
// -c stores them one after another, so one read of the host file serves
// a whole run instead of one small read per cluster. It returns how many
// bytes of p it filled; the caller looks up what follows the run.
func (img *Image) readCompressedRun(l1 []uint64, p []byte, off int64, m mapping) (int, error) {
	type unit struct {
		off, n     int64 // guest range, within one cluster
		host, size int64
	}
	h0, size := img.lay.CompressedDescriptor(m.entry)
	host := int64(h0)
	units := []unit{{off, m.length, host, size}}
	start, end := host, host+size
	done := m.length
	for done < int64(len(p)) {
		img.mu.Lock()
		next, err := img.lookupIn(l1, off+done, int64(len(p))-done)
		img.mu.Unlock()
		if err != nil || next.typ != Compressed {
			break
		}
		hu, s := img.lay.CompressedDescriptor(next.entry)
		h := int64(hu)
		// Descriptors round sizes up to sectors, so neighbours overlap;
		// a cluster elsewhere in the file ends the run.
		if h < start || h > end+img.lay.ClusterSize || h+s-start > compressedSpan {
			break
		}
		units = append(units, unit{off + done, next.length, h, s})
		end = max(end, h+s)
		done += next.length
	}
	var buf []byte
	if end-start <= compressedSpan {
		buf = spanBufs.Get()[:end-start]
		defer spanBufs.Put(buf[:compressedSpan])
	} else {
		buf = make([]byte, end-start)
	}
	if _, err := img.file.ReadAt(buf, start); err != nil {
		return 0, fmt.Errorf("%s: reading compressed clusters at host offset %#x: %w", img.file.Name(), start, err)
	}
	cs := img.lay.ClusterSize
	var whole []byte
	for _, u := range units {
		src := buf[u.host-start : u.host-start+u.size]
		dst := p[u.off-off : u.off-off+u.n]
		if u.n == cs {
			// A whole cluster inflates straight into p.
			if err := img.decompressAt(dst, src, uint64(u.host), u.off); err != nil {
				return 0, err
			}
			continue
		}
		if whole == nil {
			whole = make([]byte, cs)
		}
		if err := img.decompressAt(whole, src, uint64(u.host), u.off); err != nil {
			return 0, err
		}
		copy(dst, whole[u.off&(cs-1):])
	}
	return int(done), nil
}

// WriteCompressed stores compressed data (from Compress) as the cluster
// at guest offset off. Host space is allocated byte by byte, packing
// compressed clusters one after another as qcow2_alloc_bytes does; each
// host cluster's refcount counts the compressed clusters touching it.
//
// It holds freeMu exclusively because the cluster's old storage is freed.
func (img *Image) WriteCompressed(off int64, compressed []byte) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	cs := img.lay.ClusterSize
	if off&(cs-1) != 0 {
		return fmt.Errorf("%s: compressed write at unaligned offset %d", img.file.Name(), off)
	}
	if len(compressed) == 0 || int64(len(compressed)) >= cs {
		return fmt.Errorf("%s: compressed cluster of %d bytes does not fit a %d-byte cluster", img.file.Name(), len(compressed), cs)
	}
	if err := img.checkWrite(off, min(cs, img.Size()-off)); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.lay.HasDataFile {
		return fmt.Errorf("%s: compression is not supported with an external data file: %w", img.file.Name(), formats.ErrUnsupported)
	}
	if img.crypt != nil {
		return fmt.Errorf("%s: compression is not supported with encryption: %w", img.file.Name(), formats.ErrUnsupported)
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	l1i := img.lay.L1Index(off)
	t, err := img.writableL2(l1i)
	if err != nil {
		return err
	}
	host, err := img.allocBytes(int64(len(compressed)))
	if err != nil {
		return err
	}
	if _, err := img.file.WriteAt(compressed, int64(host)); err != nil {
		return fmt.Errorf("%s: writing compressed cluster at host offset %#x: %w", img.file.Name(), host, err)
	}
	if err := img.l2DependsOnRefcounts(); err != nil {
		return err
	}
	i := img.lay.L2Index(off)
	old := img.lay.ReadL2Entry(t.data, i)
	img.lay.WriteL2Entry(t.data, i, L2Entry{Raw: img.lay.EncodeCompressed(host, int64(len(compressed)))})
	t.dirty = true
	return img.freeEntry(old, false)
}

// allocBytes allocates n bytes (n < cluster size) of host space for
// compressed data, continuing in the partly used cluster of the last
// call when it has room or when the next free cluster follows it
// (qcow2_alloc_bytes). Every host cluster the bytes touch gains a
// reference.
func (img *Image) allocBytes(n int64) (uint64, error) {
	cs := img.lay.ClusterSize
	pos := img.freeBytePos
	if pos != 0 {
		rc, err := img.Refcount(pos >> img.lay.ClusterBits)
		if err != nil {
			return 0, err
		}
		if rc == MaxRefcount(img.lay.RefcountOrder) {
			pos = 0
		}
	}
	// fresh is a new cluster whose reference allocClusters already took.
	fresh := int64(-1)
	if pos == 0 || cs-pos&(cs-1) < n {
		nc, err := img.allocClusters(1)
		if err != nil {
			return 0, err
		}
		fresh = int64(nc) >> img.lay.ClusterBits
		if pos == 0 || (pos+cs-1)&^(cs-1) != int64(nc) {
			pos = int64(nc)
		}
	}
	for c := pos >> img.lay.ClusterBits; c <= (pos+n-1)>>img.lay.ClusterBits; c++ {
		if c == fresh {
			continue
		}
		if err := img.updateRefcounts(c, 1, 1); err != nil {
			return 0, err
		}
	}
	img.freeBytePos = pos + n
	if img.freeBytePos&(cs-1) == 0 {
		img.freeBytePos = 0
	}
	return uint64(pos), nil
}
