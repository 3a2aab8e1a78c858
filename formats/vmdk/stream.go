package vmdk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/imgfs/imgfs/formats"
	"github.com/klauspost/compress/zlib"
)

// Stream-optimized extents store each grain as a marker (guest sector,
// compressed size) followed by a zlib stream, appended at the end of the
// extent. QEMU 7.2 creates them with the grain directory and tables in
// front, like monolithicSparse, and never writes a footer; VMware's
// images with the directory in a footer (gdAtEnd) are read here too.

// zlibLevel is zlib's Z_DEFAULT_COMPRESSION, what QEMU's compress()
// uses.
const zlibLevel = 6

var (
	zlibWriters = formats.NewFreeList(0, func() *zlib.Writer {
		w, err := zlib.NewWriterLevel(io.Discard, zlibLevel)
		if err != nil {
			panic(err) // zlibLevel is a valid constant level
		}
		return w
	})
	// zlib readers can only be made from a stream: build makes none.
	zlibReaders = formats.NewFreeList(0, func() io.ReadCloser { return nil })
)

// appendWriter appends what is written to buf.
type appendWriter struct{ buf []byte }

func (w *appendWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// compressGrain builds, in dst's storage, the record of a compressed
// grain as it goes on disk: room for the grain marker, which appendGrain
// fills in, then the zlib stream of src. Safe for concurrent use.
func compressGrain(dst, src []byte) []byte {
	w := zlibWriters.Get()
	defer zlibWriters.Put(w)
	out := &appendWriter{buf: append(dst[:0], make([]byte, grainMarkerSize)...)}
	w.Reset(out)
	// Writes to an appendWriter do not fail.
	w.Write(src)
	w.Close()
	return out.buf
}

// inflate decompresses a zlib stream of at most max bytes, as zlib's
// uncompress() into a buffer of that size: the stream must end (with a
// valid checksum) within it.
func inflate(src []byte, max int) ([]byte, error) {
	r := zlibReaders.Get()
	if r != nil {
		if err := r.(zlib.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
			return nil, err
		}
	} else {
		var err error
		if r, err = zlib.NewReader(bytes.NewReader(src)); err != nil {
			return nil, err
		}
	}
	defer zlibReaders.Put(r)
	// The output grows with what the stream holds rather than being
	// sized by the header's grain size.
	var out bytes.Buffer
	n, err := io.CopyN(&out, r, int64(max)+1)
	switch {
	case n > int64(max):
		return nil, fmt.Errorf("grain inflates to more than %d bytes", max)
	case err != io.EOF:
		return nil, err
	}
	return out.Bytes(), nil
}

// readCompressed reads and inflates the grain stored at host byte
// offset host (vmdk_read_extent): its marker, then at most two grains'
// worth of compressed data.
func (e *extent) readCompressed(host int64) ([]byte, error) {
	gb := e.grainBytes()
	size, err := e.f.Size()
	if err != nil {
		return nil, err
	}
	// Two grains' worth at most, and no more than the file holds.
	buf := make([]byte, max(min(2*gb, size-host), grainMarkerSize))
	if _, err := e.f.ReadAt(buf, host); err != nil {
		return nil, err
	}
	data, n := buf, gb
	if e.marker {
		n = int64(binary.LittleEndian.Uint32(buf[8:]))
		data = buf[grainMarkerSize:]
	}
	if n == 0 || n > 2*gb || n > int64(len(data)) {
		return nil, fmt.Errorf("%s: compressed grain at %#x has size %d: %w", e.f.Name(), host, n, errInval)
	}
	g, err := inflate(data[:n], int(gb))
	if err != nil {
		return nil, fmt.Errorf("%s: compressed grain at %#x: %v: %w", e.f.Name(), host, err, errInval)
	}
	return g, nil
}

// appendGrain stores a compressed grain record (from compressGrain) at
// the end of a stream extent and enters it in the grain tables. Like QEMU, the grain's full size is
// reserved behind it (QEMU writes a zero grain there first), so the file
// ends a grain past the last marker; the next grain starts at the sector
// after this one's data.
func (img *Image) appendGrain(e *extent, pos, inExt int64, rec []byte) error {
	if e.gdAtEnd {
		return fmt.Errorf("%s: writing streamOptimized images with a footer: %w", e.f.Name(), formats.ErrUnsupported)
	}
	if !e.marker {
		return fmt.Errorf("%s: compressed extent without grain markers: %w", e.f.Name(), errInval)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	state, _, w, err := e.lookup(inExt)
	if err != nil {
		return err
	}
	if state == grainData {
		return fmt.Errorf("%s: Could not write to allocated cluster for streamOptimized (offset %d): %w",
			img.file.Name(), pos, errIO)
	}
	if w.gtSector == 0 {
		return fmt.Errorf("%s: grain table for offset %d is not allocated: %w", e.f.Name(), pos, formats.ErrUnsupported)
	}
	sector, err := e.allocate()
	if err != nil {
		return err
	}
	binary.LittleEndian.PutUint64(rec, uint64(pos>>9))
	binary.LittleEndian.PutUint32(rec[8:], uint32(len(rec)-grainMarkerSize))
	at := sector * sectorSize
	if _, err := e.f.WriteAt(rec, at); err != nil {
		return err
	}
	size, err := e.f.Size()
	if err != nil {
		return err
	}
	if end := at + e.grainBytes(); size < end {
		if err := e.f.Truncate(end); err != nil {
			return err
		}
	}
	e.nextSector = (at + int64(len(rec)) + sectorSize - 1) / sectorSize
	return e.setEntry(w, uint32(sector))
}

// NeedsCompressedWrites reports whether guest data must reach the image
// as whole compressed grains (QEMU's needs_compressed_writes): true for
// stream-optimized images, which convert then writes as with -c.
func (img *Image) NeedsCompressedWrites() bool {
	return len(img.extents) > 0 && img.extents[0].compressed && img.uniform()
}

// CompressionUnit is the grain size convert -c works in: the image's
// cluster size (0 when it has none, which convert refuses).
func (img *Image) CompressionUnit() int64 {
	if !img.uniform() || len(img.extents) == 0 || img.extents[0].kind == kindFlat {
		return 0
	}
	return img.extents[0].grainBytes()
}

// Compress deflates one grain for a stream-optimized image, which stores
// every grain compressed even when that does not make it smaller (as
// QEMU does). Other images store data as it is: ok is false. Safe for
// concurrent use.
func (img *Image) Compress(dst, src []byte) ([]byte, bool) {
	if !img.NeedsCompressedWrites() {
		return nil, false
	}
	return compressGrain(dst, src), true
}

// WriteCompressed stores a grain record that Compress produced at guest
// offset off, filling in its marker. convert pads the image's short last grain to a whole one; QEMU
// compresses only the bytes inside the image, so that grain is
// recompressed from its real length.
func (img *Image) WriteCompressed(off int64, rec []byte) error {
	if err := img.checkWrite(off, 0); err != nil {
		return err
	}
	e := img.findExtent(off)
	if e == nil || !e.compressed {
		return fmt.Errorf("%s: compressed write at offset %d to an uncompressed extent: %w", img.file.Name(), off, errInval)
	}
	inExt := off - e.start
	if inExt%e.grainBytes() != 0 {
		return fmt.Errorf("%s: compressed write at unaligned offset %d: %w", img.file.Name(), off, errInval)
	}
	if rest := e.sectors*sectorSize - inExt; rest < e.grainBytes() {
		g, err := inflate(rec[grainMarkerSize:], int(e.grainBytes()))
		if err != nil {
			return fmt.Errorf("%s: compressed grain for offset %d: %w", img.file.Name(), off, err)
		}
		rec = compressGrain(nil, g[:min(int64(len(g)), rest)])
	}
	if err := img.appendGrain(e, off, inExt, rec); err != nil {
		return err
	}
	return img.wroteOnce()
}

// uniform is the condition of vmdk_co_get_info: every extent is of the
// same kind (flat, or sparse with one grain size and compression).
func (img *Image) uniform() bool {
	for _, e := range img.extents[min(1, len(img.extents)):] {
		a := img.extents[0]
		if (a.kind == kindFlat) != (e.kind == kindFlat) || a.compressed != e.compressed ||
			a.kind != kindFlat && a.grainSectors != e.grainSectors {
			return false
		}
	}
	return true
}
