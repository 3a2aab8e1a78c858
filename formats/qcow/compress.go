package qcow

import (
	"bytes"
	"fmt"
	"io"
	"syscall"

	"github.com/imgfs/imgfs/formats"
	"github.com/klauspost/compress/flate"
)

// deflateWindow is the window of QEMU's qcow streams (zlib window bits
// -12): QEMU inflates with that window, so streams must not refer
// further back.
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
)

// limitWriter appends to buf but fails once it would reach max bytes, so
// compression stops as soon as it stops paying.
type limitWriter struct {
	buf []byte
	max int
}

var errNotSmaller = fmt.Errorf("compressed data not smaller than the cluster")

func (w *limitWriter) Write(p []byte) (int, error) {
	if len(w.buf)+len(p) >= w.max {
		return 0, errNotSmaller
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// CompressionUnit is the cluster size: Compress takes whole clusters.
func (img *Image) CompressionUnit() int64 { return img.clusterSize }

// Compress deflates one cluster (zero-padded when src is the short last
// cluster). ok is false when the result is not smaller than a cluster,
// as qcow_co_pwritev_compressed then writes the cluster plainly. Safe
// for concurrent use.
func (img *Image) Compress(dst, src []byte) ([]byte, bool) {
	if len(src) < int(img.clusterSize) {
		padded := make([]byte, img.clusterSize)
		copy(padded, src)
		src = padded
	}
	w := deflateWriters.Get()
	defer deflateWriters.Put(w)
	lw := &limitWriter{buf: dst[:0], max: int(img.clusterSize)}
	w.Reset(lw)
	if _, err := w.Write(src); err != nil {
		return nil, false
	}
	if err := w.Close(); err != nil {
		return nil, false
	}
	return lw.buf, true
}

// readCompressed reads and inflates the compressed cluster of L2 entry
// e; pos is the guest offset, for the error message. The last cluster
// inflated is kept, as QEMU keeps it, for reads smaller than a cluster;
// callers must not modify the result.
func (img *Image) readCompressed(e uint64, pos int64) ([]byte, error) {
	host, size := img.compressedLoc(e)
	img.lastMu.Lock()
	if img.lastData != nil && img.lastEntry == e {
		out := img.lastData
		img.lastMu.Unlock()
		return out, nil
	}
	img.lastMu.Unlock()
	src := make([]byte, size)
	if _, err := img.f.ReadAt(src, int64(host)); err != nil {
		return nil, fmt.Errorf("%s: reading compressed cluster at host offset %#x: %w", img.f.Name(), host, err)
	}
	r := deflateReaders.Get()
	defer deflateReaders.Put(r)
	out := make([]byte, img.clusterSize)
	err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil)
	if err == nil {
		_, err = io.ReadFull(r, out)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: compressed cluster at host offset %#x (guest offset %#x) is unreadable (%v): %w: %w",
			img.f.Name(), host, pos&^(img.clusterSize-1), err, formats.ErrCorrupt, syscall.EIO)
	}
	img.lastMu.Lock()
	img.lastEntry, img.lastData = e, out
	img.lastMu.Unlock()
	return out, nil
}

// WriteCompressed stores compressed data (from Compress) as the cluster
// at guest offset off: the bytes go right at the end of the file,
// unaligned, as qcow packs compressed clusters, then the L2 entry.
// QEMU only compresses into clusters not yet allocated; imgfs always
// appends, so an allocated cluster is replaced (its old storage leaks,
// as everything freed in qcow does).
func (img *Image) WriteCompressed(off int64, compressed []byte) error {
	if off&(img.clusterSize-1) != 0 {
		return fmt.Errorf("%s: compressed write at unaligned offset %d", img.f.Name(), off)
	}
	if len(compressed) == 0 || int64(len(compressed)) >= img.clusterSize {
		return fmt.Errorf("%s: compressed cluster of %d bytes does not fit a %d-byte cluster", img.f.Name(), len(compressed), img.clusterSize)
	}
	if err := img.checkWrite(off, min(img.clusterSize, img.size-off)); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	t, l2off, err := img.writableL2(off)
	if err != nil {
		return err
	}
	host, err := img.f.Size()
	if err != nil {
		return err
	}
	if _, err := img.f.WriteAt(compressed, host); err != nil {
		return fmt.Errorf("%s: writing compressed cluster at host offset %#x: %w", img.f.Name(), host, err)
	}
	e := uint64(host) | oflagCompressed | uint64(len(compressed))<<(63-img.clusterBits)
	return img.setL2(t, l2off, off, e)
}
