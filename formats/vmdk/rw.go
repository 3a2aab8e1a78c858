package vmdk

import (
	"fmt"
	"io"

	"github.com/imgfs/imgfs/formats"
)

// findExtent returns the extent holding guest byte off (find_extent).
func (img *Image) findExtent(off int64) *extent {
	for _, e := range img.extents {
		if off < e.start+e.sectors*sectorSize {
			return e
		}
	}
	return nil
}

// chunk is the part of a request inside one grain of one extent: the
// extent, the offset in the extent, the offset in the grain and the
// length. QEMU ends a chunk at the end of its grain only, so when a
// sparse extent's size is not a whole number of grains its last grain
// also takes bytes of the next extent's range, but only for requests
// that start before the boundary; that makes what a byte reads depend
// on how it is asked for, so here chunks end at the extent too (as
// VMware's specification has it). qemu-img and VMware make extents of
// whole grains, where the two agree.
func (img *Image) chunk(pos, remaining int64) (*extent, int64, int64, int64, error) {
	e := img.findExtent(pos)
	if e == nil {
		return nil, 0, 0, 0, fmt.Errorf("%s: no extent at offset %d: %w", img.file.Name(), pos, errIO)
	}
	inExt := pos - e.start
	inGrain := inExt % e.grainBytes()
	n := min(remaining, e.grainBytes()-inGrain, e.sectors*sectorSize-inExt)
	return e, inExt, inGrain, n, nil
}

// ReadAt reads guest bytes (vmdk_co_preadv): allocated grains from the
// extent, zeroed grains as zeroes, unallocated ones from the parent
// (while its CID matches) or as zeroes.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, errIO)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	want := len(p)
	p = p[:min(int64(len(p)), img.size-off)]
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		e, inExt, inGrain, n, err := img.chunk(pos, int64(len(p)-done))
		if err != nil {
			return done, err
		}
		buf := p[done : done+int(n)]
		img.mu.Lock()
		state, host, _, err := e.lookup(inExt)
		valid := true
		if err == nil && state == grainUnalloc && img.backing != nil {
			valid = img.backingValid()
		}
		img.mu.Unlock()
		switch {
		case err != nil:
			return done, err
		case state == grainData && e.compressed:
			g, err := e.readCompressed(host)
			if err != nil {
				return done, err
			}
			if inGrain+n > int64(len(g)) {
				return done, fmt.Errorf("%s: compressed grain at %#x holds %d bytes, read needs %d: %w",
					e.f.Name(), host, len(g), inGrain+n, errInval)
			}
			copy(buf, g[inGrain:])
		case state == grainData:
			if _, err := e.f.ReadAt(buf, host+inGrain); err != nil {
				return done, err
			}
		case state == grainUnalloc && img.backing != nil:
			if !valid {
				return done, fmt.Errorf("%s: parent CID does not match the backing image: %w", img.file.Name(), errInval)
			}
			if err := formats.ReadBacking(img.backing, buf, pos); err != nil {
				return done, err
			}
		default:
			clear(buf)
		}
		done += int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// checkWrite refuses writes to read-only images and outside the image.
func (img *Image) checkWrite(off, length int64) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if off < 0 || length < 0 || off > img.size || length > img.size-off {
		return fmt.Errorf("write of %d bytes at offset %d outside the image (%d bytes): %w", length, off, img.size, errIO)
	}
	return nil
}

// WriteAt writes guest bytes (vmdk_pwritev). Flat extents are written in
// place; sparse grains are allocated at the end of their extent on first
// write, filled from the parent (or with zeroes) around the new data,
// and then entered in both grain tables. Stream-optimized extents take
// whole grains only, each once, compressed.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		e, inExt, inGrain, n, err := img.chunk(pos, int64(len(p)-done))
		if err != nil {
			return done, err
		}
		if err := img.writeChunk(e, pos, inExt, inGrain, p[done:done+int(n)]); err != nil {
			return done, err
		}
		done += int(n)
		if err := img.wroteOnce(); err != nil {
			return done, err
		}
	}
	return done, nil
}

// wroteOnce updates the CID after the first successful write.
func (img *Image) wroteOnce() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.updateCID()
}

func (img *Image) writeChunk(e *extent, pos, inExt, inGrain int64, data []byte) error {
	switch {
	case e.kind == kindFlat:
		_, err := e.f.WriteAt(data, e.flatOffset+inExt)
		return err
	case e.kind == kindSESparse:
		return fmt.Errorf("%s: writing seSparse extents: %w", e.f.Name(), formats.ErrUnsupported)
	case e.compressed:
		if inGrain != 0 || int64(len(data)) < e.grainBytes() && inExt+int64(len(data)) != e.sectors*sectorSize {
			return fmt.Errorf("%s: streamOptimized extents take whole grains only (%d bytes at grain offset %d): %w",
				e.f.Name(), len(data), inGrain, errInval)
		}
		return img.appendGrain(e, pos, inExt, compressGrain(nil, data))
	}
	img.mu.Lock()
	state, host, w, err := e.lookup(inExt)
	if err != nil || state == grainData {
		img.mu.Unlock()
		if err != nil {
			return err
		}
		_, err = e.f.WriteAt(data, host+inGrain)
		return err
	}
	defer img.mu.Unlock()
	return img.allocateGrain(e, state, w, pos-inGrain, inGrain, data)
}

// allocateGrain gives a grain storage (get_cluster_offset with allocate):
// the whole grain is written, new data over the parent's or zeroes, before
// the table entries point to it. The caller holds mu.
func (img *Image) allocateGrain(e *extent, state grainState, w where, grainStart, inGrain int64, data []byte) error {
	if w.gtSector == 0 {
		return fmt.Errorf("%s: grain table for offset %d is not allocated: %w", e.f.Name(), grainStart, formats.ErrUnsupported)
	}
	sector, err := e.allocate()
	if err != nil {
		return err
	}
	grain := data
	if int64(len(data)) != e.grainBytes() {
		grain = make([]byte, e.grainBytes())
		if img.backing != nil && state != grainZero {
			if !img.backingValid() {
				return fmt.Errorf("%s: parent CID does not match the backing image: %w", img.file.Name(), errInval)
			}
			if err := formats.ReadBacking(img.backing, grain, grainStart); err != nil {
				return err
			}
		}
		copy(grain[inGrain:], data)
	}
	if _, err := e.f.WriteAt(grain, sector*sectorSize); err != nil {
		return err
	}
	return e.setEntry(w, uint32(sector))
}

// WriteZeroes makes a range read as zeroes. Whole grains of extents with
// the zeroed-grain feature get the zeroed table entry; everything else
// is written with zeroes, as QEMU's block layer falls back to when the
// driver cannot (vmdk_co_pwrite_zeroes).
func (img *Image) WriteZeroes(off, length int64, _ bool) error {
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	var zeroes []byte
	for done := int64(0); done < length; {
		pos := off + done
		e, inExt, inGrain, n, err := img.chunk(pos, length-done)
		if err != nil {
			return err
		}
		if e.kind == kindSparse && e.zeroGrain && !e.compressed && inGrain == 0 && n == e.grainBytes() {
			ok, err := img.zeroGrain(e, inExt)
			if err != nil {
				return err
			}
			if ok {
				done += n
				continue
			}
		}
		if int64(len(zeroes)) < n {
			zeroes = make([]byte, n)
		}
		if _, err := img.WriteAt(zeroes[:n], pos); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// zeroGrain marks one grain zeroed; false when its grain table is
// missing and zeroes must be written instead.
func (img *Image) zeroGrain(e *extent, inExt int64) (bool, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	state, _, w, err := e.lookup(inExt)
	if err != nil {
		return false, err
	}
	if w.gtSector == 0 {
		return false, nil
	}
	if state != grainZero {
		if err := e.setEntry(w, gteZeroed); err != nil {
			return false, err
		}
	}
	return true, img.updateCID()
}

// maxMerge bounds the grains one BlockStatus call looks at.
const maxMerge = 1 << 14

// BlockStatus describes the grains from off (vmdk_co_block_status):
// unallocated, zeroed, data at a host offset, or compressed data.
// Consecutive grains of one kind (and, for data, contiguous in the file)
// are reported as one run. Flat extents look into their file as QEMU's
// BDRV_BLOCK_RECURSE does: holes there are data that reads as zeroes.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("block status of %d bytes at offset %d: %w", length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	e, inExt, inGrain, n, err := img.chunk(off, length)
	if err != nil {
		return formats.Extent{}, err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	state, host, w, err := e.lookup(inExt)
	if err != nil {
		return formats.Extent{}, err
	}
	span := e.l1EntrySectors * sectorSize
	if state == grainUnalloc && w.gtSector == 0 && e.kind != kindFlat {
		// No grain table: the rest of its span is unallocated.
		n = min(length, span-inExt%span, e.sectors*sectorSize-inExt)
	}
	// Merge following grains of the same extent while they match, up to
	// a bounded number of lookups so that one call stays short.
	for i := 0; i < maxMerge && n < length && inExt+n < e.sectors*sectorSize && e.kind != kindFlat &&
		!(state == grainData && e.compressed); i++ {
		st, h, w2, err := e.lookup(inExt + n)
		if err != nil || st != state || state == grainData && h != host+inGrain+n {
			break
		}
		step := min(length-n, e.grainBytes(), e.sectors*sectorSize-inExt-n)
		if st == grainUnalloc && w2.gtSector == 0 {
			step = min(length-n, span-(inExt+n)%span, e.sectors*sectorSize-inExt-n)
		}
		n += step
	}
	switch state {
	case grainUnalloc:
		return formats.Extent{Length: n}, nil
	case grainZero:
		return formats.Extent{Length: n, Status: formats.StatusZero}, nil
	}
	if e.compressed {
		return formats.Extent{Length: n, Status: formats.StatusData | formats.StatusCompressed}, nil
	}
	x := formats.Extent{Length: n, Status: formats.StatusData | formats.StatusOffsetValid,
		Offset: host + inGrain, File: e.f.Name()}
	if e.kind == kindFlat {
		data, k, err := e.f.DataStatus(x.Offset, n)
		if err != nil {
			return formats.Extent{}, err
		}
		if !data {
			x.Status |= formats.StatusZero
		}
		x.Length = max(k, 1)
	}
	return x, nil
}
