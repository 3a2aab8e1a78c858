package vhdx

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"

	"github.com/imgfs/imgfs/formats"
)

// The metadata log (MS-VHDX 2.3) is a circular buffer of 4 KiB sectors.
// An entry is a header sector holding the entry header and the first
// descriptors, further descriptor sectors, then one data sector per data
// descriptor. The header names the log GUID; entries count only while the
// current image header carries the same GUID.
const (
	logSectorSize  = 4 * kiB
	logEntryHdrLen = 64
	logDescLen     = 32
	// logMinSize is also the log's alignment.
	logMinSize = 1 * miB
	// maxLogGrowth bounds how far past the file's end a replayed entry
	// may write or grow the file: QEMU's entries never grow it, and an
	// entry of another writer covers a few blocks at most.
	maxLogGrowth = 4 << 30
)

var (
	logEntrySignature = []byte("loge")
	logDescSignature  = []byte("desc")
	logZeroSignature  = []byte("zero")
	logDataSignature  = []byte("data")
)

// logState is the session's position in the log (QEMU's VHDXLogEntries).
type logState struct {
	offset, length uint64 // the log region
	// write is where the next entry goes, tail the start of the last
	// one written, both relative to offset.
	write, tail uint32
	sequence    uint64
}

// logEntryHeader is an entry's first 64 bytes (MS-VHDX 2.3.1.1).
type logEntryHeader struct {
	Checksum          uint32
	EntryLength       uint32
	Tail              uint32
	Sequence          uint64
	DescriptorCount   uint32
	LogGUID           guid
	FlushedFileOffset uint64
	LastFileOffset    uint64
	signatureOK       bool
}

func decodeLogEntryHeader(b []byte) logEntryHeader {
	le := binary.LittleEndian
	h := logEntryHeader{
		signatureOK:       bytes.Equal(b[0:4], logEntrySignature),
		Checksum:          le.Uint32(b[4:]),
		EntryLength:       le.Uint32(b[8:]),
		Tail:              le.Uint32(b[12:]),
		Sequence:          le.Uint64(b[16:]),
		DescriptorCount:   le.Uint32(b[24:]),
		FlushedFileOffset: le.Uint64(b[48:]),
		LastFileOffset:    le.Uint64(b[56:]),
	}
	copy(h.LogGUID[:], b[32:48])
	return h
}

func (h *logEntryHeader) encode(b []byte) {
	le := binary.LittleEndian
	copy(b[0:4], logEntrySignature)
	le.PutUint32(b[4:], h.Checksum)
	le.PutUint32(b[8:], h.EntryLength)
	le.PutUint32(b[12:], h.Tail)
	le.PutUint64(b[16:], h.Sequence)
	le.PutUint32(b[24:], h.DescriptorCount)
	le.PutUint32(b[28:], 0)
	copy(b[32:48], h.LogGUID[:])
	le.PutUint64(b[48:], h.FlushedFileOffset)
	le.PutUint64(b[56:], h.LastFileOffset)
}

// logDescriptor is a data ("desc") or zero descriptor (MS-VHDX 2.3.1.2-3).
type logDescriptor struct {
	Zero bool
	// TrailingBytes and LeadingBytes are a data sector's bytes 4092..4095
	// and 0..7; ZeroLength is a zero descriptor's length.
	TrailingBytes [4]byte
	LeadingBytes  [8]byte
	ZeroLength    uint64
	FileOffset    uint64
	Sequence      uint64
	signature     [4]byte
}

func decodeLogDescriptor(b []byte) logDescriptor {
	le := binary.LittleEndian
	d := logDescriptor{
		Zero:       bytes.Equal(b[0:4], logZeroSignature),
		ZeroLength: le.Uint64(b[8:]),
		FileOffset: le.Uint64(b[16:]),
		Sequence:   le.Uint64(b[24:]),
	}
	copy(d.signature[:], b[0:4])
	copy(d.TrailingBytes[:], b[4:8])
	copy(d.LeadingBytes[:], b[8:16])
	return d
}

// valid is vhdx_log_desc_is_valid.
func (d *logDescriptor) valid(seq uint64) bool {
	if d.Sequence != seq || d.FileOffset%logSectorSize != 0 {
		return false
	}
	if d.Zero {
		return d.ZeroLength%logSectorSize == 0
	}
	return bytes.Equal(d.signature[:], logDescSignature)
}

// descSectors is how many sectors hold the entry header and n
// descriptors (vhdx_compute_desc_sectors): never 0.
func descSectors(n uint32) uint32 { return (n + 2 + 127) / 128 }

// logReader walks the log's circular buffer sector by sector.
type logReader struct {
	img  *Image
	log  *logState
	read uint32
}

func (r *logReader) next(idx uint32) uint32 {
	idx += logSectorSize
	if uint64(idx) >= r.log.length {
		return 0
	}
	return idx
}

// sector reads the sector at the read position and advances.
func (r *logReader) sector(buf []byte) error {
	if _, err := r.img.f.ReadAt(buf[:logSectorSize], int64(r.log.offset)+int64(r.read)); err != nil {
		return err
	}
	r.read = r.next(r.read)
	return nil
}

// peek reads the entry header at the read position.
func (r *logReader) peek() (logEntryHeader, error) {
	buf := make([]byte, logEntryHdrLen)
	if _, err := r.img.f.ReadAt(buf, int64(r.log.offset)+int64(r.read)); err != nil {
		return logEntryHeader{}, err
	}
	return decodeLogEntryHeader(buf), nil
}

// headerValid is vhdx_log_hdr_is_valid.
func (r *logReader) headerValid(h *logEntryHeader) bool {
	return h.signatureOK && uint64(h.EntryLength) <= r.log.length && h.EntryLength%logSectorSize == 0 &&
		h.Sequence != 0 && h.LogGUID == r.img.headers[r.img.cur].LogGUID &&
		uint64(h.DescriptorCount)*logDescLen <= uint64(h.EntryLength)
}

// descriptors reads the header and descriptor sectors of the entry at
// the read position, advancing past them, and checks every descriptor
// (vhdx_log_read_desc). An invalid descriptor is an error, not just an
// invalid entry, as in QEMU.
func (r *logReader) descriptors() (logEntryHeader, []logDescriptor, []byte, error) {
	h, err := r.peek()
	if err != nil {
		return h, nil, nil, err
	}
	if !r.headerValid(&h) {
		return h, nil, nil, invalid(r.img.f.Name(), "log entry at %d invalid", r.read)
	}
	// DescriptorCount*32 <= EntryLength <= log length bounds this.
	n := descSectors(h.DescriptorCount)
	raw := make([]byte, int(n)*logSectorSize)
	for i := range n {
		if err := r.sector(raw[int(i)*logSectorSize:]); err != nil {
			return h, nil, nil, err
		}
	}
	descs := make([]logDescriptor, h.DescriptorCount)
	for i := range descs {
		descs[i] = decodeLogDescriptor(raw[logEntryHdrLen+i*logDescLen:])
		if !descs[i].valid(h.Sequence) {
			return h, nil, nil, invalid(r.img.f.Name(), "log descriptor %d of sequence %d invalid", i, h.Sequence)
		}
	}
	return h, descs, raw, nil
}

// validateEntry is vhdx_validate_log_entry: it checks the entry at the
// read position (its header, descriptors and checksum over all its
// sectors) and advances past it, or by one sector when the header is
// not valid. prevSeq > 0 asks for the next sequence number.
func (r *logReader) validateEntry(prevSeq uint64) (logEntryHeader, bool, error) {
	h, err := r.peek()
	if err != nil {
		return h, false, err
	}
	if !r.headerValid(&h) || prevSeq > 0 && h.Sequence != prevSeq+1 {
		r.read = r.next(r.read)
		return h, false, nil
	}
	_, _, raw, err := r.descriptors()
	if err != nil {
		return h, false, err
	}
	binary.LittleEndian.PutUint32(raw[4:], 0)
	crc := crc32.Update(0, castagnoli, raw)
	total := h.EntryLength / logSectorSize
	sec := make([]byte, logSectorSize)
	for i := descSectors(h.DescriptorCount); i < total; i++ {
		if err := r.sector(sec); err != nil {
			return h, false, err
		}
		crc = crc32.Update(crc, castagnoli, sec)
	}
	return h, crc == h.Checksum, nil
}

// logSequence is a run of valid entries to replay.
type logSequence struct {
	valid       bool
	count       int
	read, write uint32
	last        logEntryHeader
}

// searchLog is vhdx_log_search: from every sector of the log, follow the
// valid entries; the run whose first entry has the highest sequence
// number wins. Like QEMU, the second entry of a run may have any
// sequence number; only later ones must count up.
func (img *Image) searchLog() (logSequence, error) {
	var cand logSequence
	r := &logReader{img: img, log: &img.log}
	for {
		tail := r.read
		h, ok, err := r.validateEntry(0)
		if err != nil {
			return cand, err
		}
		if ok {
			cur := logSequence{valid: true, count: 1, read: tail, write: r.read, last: h}
			var seq uint64
			for {
				h2, ok, err := r.validateEntry(seq)
				if err != nil {
					return cand, err
				}
				if !ok {
					break
				}
				cur.write = r.read
				cur.count++
				seq = h2.Sequence
			}
			if !cand.valid || cur.last.Sequence > cand.last.Sequence {
				cand = cur
			}
		}
		if r.read < tail {
			break
		}
	}
	if cand.valid {
		img.log.sequence = cand.last.Sequence + 1
	}
	return cand, nil
}

// openLog is vhdx_parse_log: check the log fields, and replay a log
// that holds a valid sequence, which needs a writable image.
func (img *Image) openLog() error {
	name := img.f.Name()
	h := img.headers[img.cur]
	img.log = logState{offset: h.LogOffset, length: uint64(h.LogLength)}
	if h.LogOffset < logMinSize || h.LogOffset%logMinSize != 0 {
		return invalid(name, "log offset %d", h.LogOffset)
	}
	if h.LogVersion != 0 {
		return invalid(name, "log version %d", h.LogVersion)
	}
	if h.LogGUID == (guid{}) || h.LogLength == 0 {
		return nil
	}
	if h.LogLength%logMinSize != 0 {
		return invalid(name, "log length %d", h.LogLength)
	}
	fileSize, err := img.f.Size()
	if err != nil {
		return err
	}
	if h.LogOffset+uint64(h.LogLength) > uint64(fileSize) {
		return invalid(name, "log at %d+%d past the end of the file (%d bytes)", h.LogOffset, h.LogLength, fileSize)
	}
	seq, err := img.searchLog()
	if err != nil || !seq.valid {
		return err
	}
	if img.readOnly {
		return formats.Errorf(formats.ErrReadOnly,
			"VHDX image file '%s' opened read-only, but contains a log that needs to be replayed\n"+
				"To replay the log, run:\nqemu-img check -r all '%s'", name, name)
	}
	if err := img.replay(seq); err != nil {
		return err
	}
	img.logReplayed = true
	return nil
}

// replay is vhdx_log_flush: write every descriptor of the sequence to
// its place, grow the file to the entries' last file offset, then mark
// the log empty.
func (img *Image) replay(seq logSequence) error {
	name := img.f.Name()
	if err := img.visibleWrite(); err != nil {
		return err
	}
	log := img.log
	log.write = seq.write
	r := &logReader{img: img, log: &log, read: seq.read}
	data := make([]byte, logSectorSize)
	for range seq.count {
		peeked, err := r.peek()
		if err != nil {
			return err
		}
		fileLen, err := img.f.Size()
		if err != nil {
			return err
		}
		if peeked.FlushedFileOffset > uint64(fileLen) {
			return invalid(name, "log flushed file offset %d past the end of the file (%d bytes)", peeked.FlushedFileOffset, fileLen)
		}
		h, descs, _, err := r.descriptors()
		if err != nil {
			return err
		}
		if h.LastFileOffset > uint64(fileLen)+maxLogGrowth {
			return invalid(name, "log last file offset %d far past the end of the file (%d bytes)", h.LastFileOffset, fileLen)
		}
		limit := max(uint64(fileLen), h.LastFileOffset+miB)
		for i := range descs {
			d := &descs[i]
			if d.Zero {
				if d.FileOffset > limit || d.ZeroLength > limit-d.FileOffset {
					return invalid(name, "log zero descriptor %d+%d outside the file", d.FileOffset, d.ZeroLength)
				}
				if err := writeZeroes(img.f, int64(d.FileOffset), int64(d.ZeroLength)); err != nil {
					return err
				}
				continue
			}
			if err := r.sector(data); err != nil {
				return err
			}
			le := binary.LittleEndian
			if uint64(le.Uint32(data[4:]))<<32|uint64(le.Uint32(data[4092:])) != d.Sequence {
				return invalid(name, "log data sector sequence mismatch")
			}
			if d.FileOffset >= limit {
				return invalid(name, "log data descriptor offset %d outside the file", d.FileOffset)
			}
			copy(data[0:8], d.LeadingBytes[:])
			copy(data[4092:], d.TrailingBytes[:])
			if _, err := img.f.WriteAt(data, int64(d.FileOffset)); err != nil {
				return err
			}
		}
		// QEMU grows the file only to an unaligned last file offset,
		// rounded up to a MiB.
		if uint64(fileLen) < h.LastFileOffset && h.LastFileOffset%miB != 0 {
			if err := img.f.Truncate(int64(h.LastFileOffset+miB-1) &^ (miB - 1)); err != nil {
				return err
			}
		}
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	// The log is empty again; the next entry starts at its beginning.
	img.log.write, img.log.tail = 0, 0
	return img.updateHeaders(false, &guid{})
}
