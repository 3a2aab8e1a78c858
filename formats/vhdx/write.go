package vhdx

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/imgfs/imgfs/formats"
)

// updateHeader is vhdx_update_header: the non-current header gets the
// next sequence number, the session's file write GUID, a new data
// write GUID when asked, and logGUID when not nil, and becomes current.
// The caller holds mu.
func (img *Image) updateHeader(newDataGUID bool, logGUID *guid) error {
	other := 1 - img.cur
	h := img.headers[other]
	h.Sequence = img.headers[img.cur].Sequence + 1
	h.FileWriteGUID = img.sessionGUID
	if newDataGUID {
		h.DataWriteGUID = newGUID()
	}
	if logGUID != nil {
		h.LogGUID = *logGUID
	}
	off := int64(header1Offset)
	if other == 1 {
		off = header2Offset
	}
	// The checksum covers the whole 4 KiB, whose tail is kept as found.
	buf := make([]byte, headerCRCSize)
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return err
	}
	h.encode(buf)
	if _, err := img.f.WriteAt(buf[:headerLen], off); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.headers[other] = h
	img.cur = other
	return nil
}

// updateHeaders updates both headers, so that both hold the new state
// (vhdx_update_headers). The caller holds mu.
func (img *Image) updateHeaders(newDataGUID bool, logGUID *guid) error {
	if err := img.updateHeader(newDataGUID, logGUID); err != nil {
		return err
	}
	return img.updateHeader(newDataGUID, logGUID)
}

// visibleWrite renews the data write GUID before the session's first
// change a guest could see (vhdx_user_visible_write). The caller holds
// mu. Like QEMU it is tried once per session.
func (img *Image) visibleWrite() error {
	if img.visibleWritten {
		return nil
	}
	img.visibleWritten = true
	return img.updateHeaders(true, nil)
}

// checkWrite refuses writes to a read-only image and outside it.
func (img *Image) checkWrite(off, length int64) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if off < 0 || length < 0 || off > img.size || length > img.size-off {
		return fmt.Errorf("write of %d bytes at offset %d outside the image (%d bytes): %w", length, off, img.size, errIO)
	}
	return nil
}

// pending is a piece of a write to a block that has no data yet.
type pending struct {
	block int64 // payload block number
	pos   int64 // guest offset
	data  []byte
}

// WriteAt writes guest bytes. Blocks without data are allocated at the
// end of the file (1 MiB aligned, as QEMU) and entered into the BAT
// through the log. A write that does not fit in Size fails as a whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	img.mu.Lock()
	err := img.visibleWrite()
	img.mu.Unlock()
	if err != nil {
		return 0, err
	}
	var todo []pending
	for done := 0; done < len(p); {
		pos := off + int64(done)
		n := int(min(int64(len(p)-done), img.blockSize-pos%img.blockSize))
		state, host, err := img.lookup(pos)
		if err != nil {
			return 0, err
		}
		if state == blockFullyPresent {
			if _, err := img.f.WriteAt(p[done:done+n], host); err != nil {
				return 0, err
			}
		} else {
			todo = append(todo, pending{block: pos / img.blockSize, pos: pos, data: p[done : done+n]})
		}
		done += n
	}
	if len(todo) > 0 {
		if err := img.allocate(todo); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// allocate gives the blocks of todo file space, writes their data,
// makes it durable, and only then records the blocks in the BAT through
// the log, so that a crash never leaves the BAT pointing at garbage.
// Blocks are fresh file space, which reads as zeroes around the data,
// as ZERO and NOT_PRESENT blocks read.
func (img *Image) allocate(todo []pending) error {
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	end, err := img.f.Size()
	if err != nil {
		return err
	}
	end = (end + miB - 1) &^ (miB - 1)
	newBlocks := map[int64]int64{} // block -> host offset
	var order, inherit []int64
	for _, t := range todo {
		// Another writer may have allocated the block meanwhile.
		state, host, err := img.lookup(t.pos)
		if err != nil {
			return err
		}
		if state == blockFullyPresent {
			if _, err := img.f.WriteAt(t.data, host); err != nil {
				return err
			}
			continue
		}
		if _, ok := newBlocks[t.block]; !ok {
			newBlocks[t.block] = end
			order = append(order, t.block)
			end += img.blockSize
			if img.hasParent && state != blockZero {
				inherit = append(inherit, t.block)
			}
		}
	}
	if len(order) == 0 {
		return nil
	}
	if err := img.f.Truncate(end); err != nil {
		return fmt.Errorf("%s: could not grow the file: %w", img.f.Name(), err)
	}
	// A block of a differencing image keeps what it read so far (from
	// the parent or, partially present, from both).
	for _, b := range inherit {
		if err := img.copyBlock(b, newBlocks[b]); err != nil {
			return err
		}
	}
	for _, t := range todo {
		if host, ok := newBlocks[t.block]; ok {
			if _, err := img.f.WriteAt(t.data, host+t.pos%img.blockSize); err != nil {
				return err
			}
		}
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	updates := map[int64]uint64{}
	for _, b := range order {
		updates[img.batIndex(b)] = uint64(newBlocks[b]) | blockFullyPresent
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.writeBAT(updates)
}

// copyBlock writes the current content of block b (as the BAT still
// describes it) to host offset dst, in pieces of at most zeroChunk.
func (img *Image) copyBlock(b, dst int64) error {
	start := b * img.blockSize
	end := min(start+img.blockSize, img.size)
	buf := make([]byte, min(end-start, zeroChunk))
	for pos := start; pos < end; pos += int64(len(buf)) {
		piece := buf[:min(int64(len(buf)), end-pos)]
		if err := img.readBlock(piece, pos); err != nil {
			return err
		}
		if _, err := img.f.WriteAt(piece, dst+pos-start); err != nil {
			return err
		}
	}
	return nil
}

// maxLogDataSectors bounds one log entry's BAT sectors (each maps 512
// blocks), keeping entries well inside the minimum 1 MiB log.
const maxLogDataSectors = 64

// writeBAT records BAT entry updates (index -> entry) through the log,
// as vhdx_log_write_and_flush does for each of QEMU's BAT updates: the
// whole 4 KiB BAT sectors that change go into one log entry, which is
// made durable, then written in place, then the log is emptied. The
// caller holds mu.
func (img *Image) writeBAT(updates map[int64]uint64) error {
	sectors := map[int64]bool{}
	for idx := range updates {
		sectors[idx*8/logSectorSize] = true
	}
	list := make([]int64, 0, len(sectors))
	for s := range sectors {
		list = append(list, s)
	}
	sort.Slice(list, func(i, j int) bool { return list[i] < list[j] })
	newBAT := func(s int64) []byte {
		buf := make([]byte, logSectorSize)
		first := s * logSectorSize / 8
		for i := range int64(logSectorSize / 8) {
			e := img.bat[first+i]
			if u, ok := updates[first+i]; ok {
				e = u
			}
			binary.LittleEndian.PutUint64(buf[8*i:], e)
		}
		return buf
	}
	for len(list) > 0 {
		n := min(len(list), maxLogDataSectors)
		batch := make([]logWrite, n)
		for i, s := range list[:n] {
			batch[i] = logWrite{offset: uint64(img.batOffset + s*logSectorSize), data: newBAT(s)}
		}
		if err := img.logWriteAndFlush(batch); err != nil {
			return err
		}
		for _, s := range list[:n] {
			first := s * logSectorSize / 8
			for i := range int64(logSectorSize / 8) {
				if u, ok := updates[first+i]; ok {
					img.bat[first+i] = u
				}
			}
		}
		list = list[n:]
	}
	return nil
}

// logWrite is one 4 KiB sector of metadata to write through the log.
type logWrite struct {
	offset uint64
	data   []byte
}

// logWriteAndFlush writes one log entry holding the sectors, makes it
// durable, writes the sectors in place and empties the log again
// (vhdx_log_write, then vhdx_log_flush). The caller holds mu.
func (img *Image) logWriteAndFlush(sectors []logWrite) error {
	if err := img.writeLogEntry(sectors); err != nil {
		return err
	}
	for _, s := range sectors {
		if _, err := img.f.WriteAt(s.data, int64(s.offset)); err != nil {
			return err
		}
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	return img.updateHeaders(false, &guid{})
}

// writeLogEntry makes the log hold one entry with the sectors: a new
// log GUID goes into the headers, then the entry is written at the log's
// write position and synced. From then on a crash leaves an image whose
// log replays the sectors. The caller holds mu.
func (img *Image) writeLogEntry(sectors []logWrite) error {
	n := uint32(len(sectors))
	ds := descSectors(n)
	total := ds + n
	// The log is full when the write position meets the read position,
	// which is where this entry starts: one sector stays unused.
	if uint64(total+1)*logSectorSize > img.log.length {
		return fmt.Errorf("%s: the log (%d bytes) is too small for an entry of %d sectors: %w",
			img.f.Name(), img.log.length, total, formats.ErrUnsupported)
	}
	logGUID := newGUID()
	if err := img.updateHeaders(false, &logGUID); err != nil {
		return err
	}
	if img.log.sequence == 0 {
		img.log.sequence = 1
	}
	seq := img.log.sequence
	fileLen, err := img.f.Size()
	if err != nil {
		return err
	}
	entry := make([]byte, int(total)*logSectorSize)
	h := logEntryHeader{
		EntryLength:       total * logSectorSize,
		Tail:              img.log.tail,
		Sequence:          seq,
		DescriptorCount:   n,
		LogGUID:           logGUID,
		FlushedFileOffset: uint64(fileLen),
		LastFileOffset:    uint64(fileLen),
	}
	h.encode(entry)
	le := binary.LittleEndian
	for i, s := range sectors {
		d := entry[logEntryHdrLen+i*logDescLen:]
		copy(d[0:4], logDescSignature)
		copy(d[4:8], s.data[4092:])
		copy(d[8:16], s.data[0:8])
		le.PutUint64(d[16:], s.offset)
		le.PutUint64(d[24:], seq)
		sec := entry[(int(ds)+i)*logSectorSize:]
		copy(sec[0:4], logDataSignature)
		le.PutUint32(sec[4:], uint32(seq>>32))
		copy(sec[8:4092], s.data[8:4092])
		le.PutUint32(sec[4092:], uint32(seq))
	}
	setChecksum(entry, 4)
	start := img.log.write
	pos := start
	for i := range total {
		off := int64(img.log.offset) + int64(pos)
		if _, err := img.f.WriteAt(entry[int(i)*logSectorSize:int(i+1)*logSectorSize], off); err != nil {
			return err
		}
		pos += logSectorSize
		if uint64(pos) >= img.log.length {
			pos = 0
		}
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.log.write = pos
	img.log.sequence++
	img.log.tail = start
	return nil
}

// zeroChunk bounds the buffer writeZeroes allocates.
const zeroChunk = 1 * miB

// writeZeroes makes [off, off+n) of the file read as zeroes, with
// fallocate where the file system can and plain writes where not.
func writeZeroes(f *formats.File, off, n int64) error {
	if n == 0 || f.ZeroRange(off, n) == nil {
		return nil
	}
	buf := make([]byte, min(n, zeroChunk))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := f.WriteAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// WriteZeroes makes a range read as zeroes. Blocks without data already
// do, unless a parent supplies them; allocated blocks get zeroes written (QEMU writes zero buffers, as
// its vhdx driver has no zero-write of its own, and allocates blocks to
// hold them; imgfs does not need to).
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	img.mu.Lock()
	err := img.visibleWrite()
	img.mu.Unlock()
	if err != nil {
		return err
	}
	for pos := off; pos < off+length; {
		n := min(off+length-pos, img.blockSize-pos%img.blockSize)
		state, host, err := img.lookup(pos)
		if err != nil {
			return err
		}
		switch {
		case state == blockFullyPresent:
			if err := writeZeroes(img.f, host, n); err != nil {
				return err
			}
		case img.hasParent && state != blockZero:
			// The range reads from the parent until a block holds it.
			if _, err := img.WriteAt(make([]byte, n), pos); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}
