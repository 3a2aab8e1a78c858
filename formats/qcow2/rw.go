package qcow2

import (
	"errors"
	"fmt"
	"io"

	"github.com/imgfs/imgfs/formats"
)

// ReadAt reads guest bytes. Unallocated ranges read from the backing
// image (zeroes past its end, or without one).
func (img *Image) ReadAt(p []byte, off int64) (int, error) { return img.readAtIn(nil, p, off) }

// readAtIn is ReadAt through the L1 table l1; nil means the active one.
func (img *Image) readAtIn(l1 []uint64, p []byte, off int64) (int, error) {
	img.freeMu.RLock()
	defer img.freeMu.RUnlock()
	size := img.Size()
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset %d", img.file.Name(), off)
	}
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	for done := 0; done < n; {
		img.mu.Lock()
		m, err := img.lookupIn(l1, off+int64(done), int64(n-done))
		img.mu.Unlock()
		if err != nil {
			return done, err
		}
		if m.typ == Compressed {
			k, err := img.readCompressedRun(l1, p[done:n], off+int64(done), m)
			if err != nil {
				return done, err
			}
			done += k
			continue
		}
		if err := img.readMapping(p[done:done+int(m.length)], off+int64(done), m); err != nil {
			return done, err
		}
		done += int(m.length)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readLocked is ReadAt's loop for callers that hold img.mu (copy on
// write); the I/O then happens under the lock.
func (img *Image) readLocked(p []byte, off int64) error {
	for len(p) > 0 {
		m, err := img.lookup(off, int64(len(p)))
		if err != nil {
			return err
		}
		if err := img.readMapping(p[:m.length], off, m); err != nil {
			return err
		}
		p, off = p[m.length:], off+m.length
	}
	return nil
}

// readMapping reads len(p) guest bytes at off that lookup resolved to m.
func (img *Image) readMapping(p []byte, off int64, m mapping) error {
	switch m.typ {
	case Unallocated, UnallocatedAlloc:
		return formats.ReadBacking(img.backing, p, off)
	case ZeroPlain, ZeroAlloc:
		clear(p)
	case Normal:
		if img.crypt != nil {
			return img.readEncrypted(p, m.host, uint64(off))
		}
		if _, err := img.data.ReadAt(p, int64(m.host)); err != nil {
			return fmt.Errorf("%s: reading %d bytes at host offset %#x: %w", img.data.Name(), len(p), m.host, err)
		}
	case Compressed:
		buf, err := img.readCompressed(m.entry, off)
		if err != nil {
			return err
		}
		copy(p, buf[off&(img.lay.ClusterSize-1):])
	}
	return nil
}

// errNeedExclusive: a write step would free host clusters that
// concurrent readers may still be using; it must run with freeMu held
// exclusively.
var errNeedExclusive = errors.New("qcow2: write needs exclusive access")

// WriteAt writes guest bytes, allocating clusters and copying on write
// as needed. Writes into clusters this image owns alone go straight to
// the host file outside the metadata lock.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	img.freeMu.RLock()
	defer img.freeMu.RUnlock()
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := img.writeStep(p[done:], off+int64(done), false)
		if err == errNeedExclusive {
			img.freeMu.RUnlock()
			img.freeMu.Lock()
			n, err = img.writeStep(p[done:], off+int64(done), true)
			img.freeMu.Unlock()
			img.freeMu.RLock()
		}
		if err != nil {
			return done, err
		}
		done += int(n)
	}
	return done, nil
}

// checkWrite refuses writes to read-only images and past the end, and
// records the range in the enabled persistent bitmaps.
func (img *Image) checkWrite(off, n int64) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if off < 0 || n < 0 || off > img.size-n {
		return fmt.Errorf("%s: write of %d bytes at %d is beyond the virtual size %d", img.file.Name(), n, off, img.size)
	}
	return img.trackWrite(off, n)
}

// writeStep writes a prefix of p at off and returns its length.
// exclusive says freeMu is held exclusively, which copy on write of
// clusters with host storage needs (errNeedExclusive otherwise).
func (img *Image) writeStep(p []byte, off int64, exclusive bool) (int64, error) {
	img.mu.Lock()
	m, err := img.lookup(off, int64(len(p)))
	if err != nil {
		err = img.corruptOnWrite(err)
		img.mu.Unlock()
		return 0, err
	}
	if m.typ == Normal && (m.copied || img.lay.HasDataFile) && img.crypt != nil {
		// Encrypted writes of partial sectors read, modify and write
		// whole sectors: under the lock, so that two of them sharing a
		// sector do not lose an update.
		defer img.mu.Unlock()
		return m.length, img.writeEncrypted(p[:m.length], m.host, uint64(off))
	}
	if m.typ == Normal && (m.copied || img.lay.HasDataFile) {
		img.mu.Unlock()
		if _, err := img.data.WriteAt(p[:m.length], int64(m.host)); err != nil {
			return 0, fmt.Errorf("%s: writing %d bytes at host offset %#x: %w", img.data.Name(), m.length, m.host, err)
		}
		return m.length, nil
	}
	defer img.mu.Unlock()
	n, err := img.writeAlloc(p, off, exclusive)
	return n, img.corruptOnWrite(err)
}

// clusterWrite is the plan for one cluster of an allocating write.
type clusterWrite struct {
	guest  int64   // guest offset of the cluster
	old    L2Entry // entry before the write
	reuse  bool    // the cluster keeps its host cluster
	host   uint64  // host cluster offset
	lo, hi int64   // byte range of the cluster written to the host
	newE   L2Entry
}

// writeAlloc writes a prefix of p at off into clusters that need
// allocation, copy on write or L2 changes (zero or partially allocated
// clusters). It handles the first cluster and then every following one
// that needs a new host cluster, within one L2 table. img.mu is held.
func (img *Image) writeAlloc(p []byte, off int64, exclusive bool) (int64, error) {
	lay := &img.lay
	cs := lay.ClusterSize
	if err := img.beforeMetadataWrite(); err != nil {
		return 0, err
	}
	l1i := lay.L1Index(off)
	t, err := img.writableL2(l1i)
	if err != nil {
		return 0, err
	}
	end := min(off+int64(len(p)), (l1i+1)*lay.L1Coverage())
	var plan []clusterWrite
	var newClusters int64
	for pos := off &^ (cs - 1); pos < end; pos += cs {
		e := lay.ReadL2Entry(t.data, lay.L2Index(pos))
		ct := lay.ClusterType(e)
		w := clusterWrite{guest: pos, old: e}
		w.reuse = (ct == Normal || ct == ZeroAlloc) && (e.Copied() || lay.HasDataFile)
		if len(plan) > 0 && w.reuse {
			break
		}
		if ct == Compressed && lay.HasDataFile {
			return 0, img.markCorrupt("Compressed cluster entry found in image with external data file (L2 index: %#x)", lay.L2Index(pos))
		}
		if !w.reuse && !exclusive && (ct == Compressed || ct == Normal || ct == ZeroAlloc) {
			// The old host storage is freed below and could be handed
			// out again while a reader still uses it.
			return 0, errNeedExclusive
		}
		switch {
		case w.reuse:
			w.host = e.HostOffset()
		case lay.HasDataFile:
			w.host = uint64(pos)
		default:
			newClusters++
		}
		if w.reuse && w.host&uint64(cs-1) != 0 {
			return 0, img.markCorrupt("Cluster allocation offset %#x unaligned (L2 index: %#x)", w.host, lay.L2Index(pos))
		}
		a := max(off, pos) - pos
		b := min(end, pos+cs) - pos
		w.lo, w.hi = 0, cs
		w.newE = L2Entry{}
		if lay.ExtendedL2 {
			if w.reuse || ct == Unallocated {
				scs := lay.SubclusterSize
				w.lo, w.hi = a&^(scs-1), (b+scs-1)&^(scs-1)
				bits := uint64(1)<<(w.hi/scs) - uint64(1)<<(w.lo/scs)
				w.newE.Bitmap = (e.Bitmap | bits) &^ (bits << 32)
			} else {
				w.newE.Bitmap = 0xffffffff
			}
		}
		plan = append(plan, w)
	}
	if newClusters > 0 {
		host, err := img.allocClusters(newClusters)
		if err != nil {
			return 0, err
		}
		for i := range plan {
			if !plan[i].reuse && !lay.HasDataFile {
				plan[i].host = host
				host += uint64(cs)
			}
		}
	}
	// Data first: assemble each cluster's new bytes from p and the old
	// contents, and write runs that are contiguous on the host at once.
	var run hostRun
	written := int64(0)
	for i := range plan {
		w := &plan[i]
		a := max(off, w.guest) - w.guest
		b := min(end, w.guest+cs) - w.guest
		srcStart := w.guest + a - off
		src := p[srcStart : srcStart+b-a]
		h := w.host + uint64(w.lo)
		if !run.contiguous(h) || w.lo != 0 {
			if err := img.flushRun(&run); err != nil {
				return 0, err
			}
			run = hostRun{host: h, guest: uint64(w.guest + w.lo)}
		}
		if a == w.lo && b == w.hi {
			run.addFromP(p, int(srcStart), int(b-a))
		} else {
			chunk := make([]byte, w.hi-w.lo)
			if err := img.readLocked(chunk[:a-w.lo], w.guest+w.lo); err != nil {
				return 0, err
			}
			if err := img.readLocked(chunk[b-w.lo:], w.guest+b); err != nil {
				return 0, err
			}
			copy(chunk[a-w.lo:], src)
			run.add(chunk)
		}
		if w.hi != cs {
			// The next cluster cannot continue this run.
			if err := img.flushRun(&run); err != nil {
				return 0, err
			}
			run = hostRun{}
		}
		written = w.guest + b - off
	}
	if err := img.flushRun(&run); err != nil {
		return 0, err
	}
	// Then the L2 entries, then the old storage's refcounts. The table
	// is looked up again in case the reads above pushed it out of the
	// cache (it was written back then).
	if t, err = img.writableL2(l1i); err != nil {
		return 0, err
	}
	if newClusters > 0 {
		if err := img.l2DependsOnRefcounts(); err != nil {
			return 0, err
		}
	}
	for i := range plan {
		w := &plan[i]
		w.newE.Raw = w.host | OflagCopied
		lay.WriteL2Entry(t.data, lay.L2Index(w.guest), w.newE)
		t.dirty = true
	}
	for i := range plan {
		if w := &plan[i]; !w.reuse {
			if err := img.freeEntry(w.old, false); err != nil {
				return 0, err
			}
		}
	}
	return written, nil
}

// hostRun gathers the pieces of one host-contiguous write. Pieces that
// are consecutive slices of the caller's buffer stay a slice of it, so
// large aligned writes are not copied.
type hostRun struct {
	host uint64
	// guest is the guest offset of the run's first byte: the clusters
	// of a run are consecutive in the guest too.
	guest  uint64
	n      int
	pieces [][]byte
	// pStart/pEnd: when every piece so far is p[pStart:pEnd].
	p            []byte
	pStart, pEnd int
	fromP        bool
}

func (r *hostRun) contiguous(h uint64) bool { return r.n > 0 && r.host+uint64(r.n) == h }

func (r *hostRun) addFromP(p []byte, start, n int) {
	if r.n == 0 {
		r.p, r.pStart, r.pEnd, r.fromP = p, start, start+n, true
	} else if r.fromP && start == r.pEnd {
		r.pEnd += n
	} else {
		r.fromP = false
	}
	r.pieces = append(r.pieces, p[start:start+n])
	r.n += n
}

func (r *hostRun) add(b []byte) {
	r.fromP = false
	r.pieces = append(r.pieces, b)
	r.n += len(b)
}

// flushRun writes the run to the data file in one request, encrypted
// for an encrypted image (runs start and end on whole sectors: they
// cover whole clusters or subclusters).
func (img *Image) flushRun(r *hostRun) error {
	if r.n == 0 {
		return nil
	}
	f := img.data
	var buf []byte
	switch {
	case r.fromP && img.crypt == nil:
		buf = r.p[r.pStart:r.pEnd]
	case len(r.pieces) == 1 && img.crypt == nil:
		buf = r.pieces[0]
	default:
		// Encryption works on a copy: the pieces may be the caller's.
		buf = make([]byte, 0, r.n)
		for _, b := range r.pieces {
			buf = append(buf, b...)
		}
	}
	if img.crypt != nil {
		img.crypt.c.Encrypt(buf, img.crypt.ivSector(r.host, r.guest))
	}
	if _, err := f.WriteAt(buf, int64(r.host)); err != nil {
		return fmt.Errorf("%s: writing %d bytes at host offset %#x: %w", f.Name(), len(buf), r.host, err)
	}
	*r = hostRun{}
	return nil
}
