package vhdx

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"unicode/utf16"

	"github.com/imgfs/imgfs/formats"
)

// createOptions are vhdx's -o options in QEMU 7.2's table order (the
// order of create's "Formatting" line); the file protocol's options
// follow through Driver.CreateSpecs.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size; max of 64TB."},
	{Name: "log_size", Type: formats.OptSize, Help: "Log size; min 1MB.", Default: "1048576"},
	{Name: "block_size", Type: formats.OptSize, Help: "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.", Default: "0"},
	{Name: "subformat", Type: formats.OptString, Help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."},
	{Name: "block_state_zero", Type: formats.OptBool, Help: "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."},
}

// creator is the diagnostic creator string of the file identifier.
const creator = "imgfs"

// createParams are validated creation options.
type createParams struct {
	size      uint64
	logSize   uint64
	blockSize uint64
	fixed     bool
	zeroState bool // BAT entries in state ZERO rather than NOT_PRESENT
}

// parseCreateOptions checks the options in QEMU 7.2's order and with
// its messages: the subformat enum first (vhdx_co_create_opts' QAPI
// visit), rounding, then vhdx_co_create's checks.
func parseCreateOptions(o *formats.Options) (*createParams, error) {
	bad := func(msg string) error { return formats.Errorf(formats.ErrInvalidOption, "%s", msg) }
	p := &createParams{zeroState: true}
	switch v := o.String("subformat"); v {
	case "", "dynamic":
	case "fixed":
		p.fixed = true
	default:
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'subformat' does not accept value '%s'", v)
	}
	if o.Has("block_state_zero") {
		p.zeroState = o.Bool("block_state_zero")
	}
	size, _ := o.Uint("size")
	// QEMU rounds in 64 bits, wrapping as it does.
	p.size = (size + 511) &^ 511
	logSize, _ := o.Uint("log_size")
	if o.Has("log_size") {
		logSize = (logSize + miB - 1) &^ (miB - 1)
	}
	var blockSize uint64
	if o.Has("block_size") {
		blockSize, _ = o.Uint("block_size")
		blockSize = min((blockSize+miB-1)&^(miB-1), blockSizeMax)
	}
	if p.size > maxImageSize {
		return nil, bad("Image size too large; max of 64TB")
	}
	if logSize > math.MaxUint32 {
		return nil, bad("Log size must be smaller than 4 GB")
	}
	if logSize < miB || logSize%miB != 0 {
		return nil, bad("Log size must be a multiple of 1 MB")
	}
	p.logSize = logSize
	if blockSize == 0 {
		switch {
		case p.size > 32<<40:
			blockSize = 64 * miB
		case p.size > 100<<30:
			blockSize = 32 * miB
		case p.size > 1<<30:
			blockSize = 16 * miB
		default:
			blockSize = 8 * miB
		}
	}
	if blockSize&(blockSize-1) != 0 {
		return nil, bad("Block size must be a power of two")
	}
	p.blockSize = blockSize
	return p, nil
}

// checkProtocolOptions validates the file protocol's options as
// file-posix does before it creates the file. nocow and the extent size
// hint are accepted without effect.
func checkProtocolOptions(o *formats.Options) error {
	if o.Has("preallocation") {
		switch v := o.String("preallocation"); v {
		case "off", "falloc", "full":
		default:
			return formats.Errorf(formats.ErrInvalidOption, "invalid parameter value: %s", v)
		}
	}
	if hint, ok := o.Uint("extent_size_hint"); ok && hint > math.MaxUint32 {
		return formats.Errorf(formats.ErrInvalidOption, "Extent size hint is too large")
	}
	return nil
}

// create makes an image laid out as vhdx_co_create does: file
// identifier, two headers, two region tables, a log at 1 MiB, the BAT
// and the metadata region after it, and payload space 5 MiB after the
// BAT (for fixed images the whole virtual size, preallocated by size).
// As in QEMU the file is created before the vhdx options are checked.
func create(filename string, o *formats.Options) error {
	if err := checkProtocolOptions(o); err != nil {
		return err
	}
	f, err := formats.CreateFile(filename)
	if err != nil {
		return err
	}
	p, err := parseCreateOptions(o)
	if err == nil {
		err = writeNewImage(f, p)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func writeNewImage(f *formats.File, p *createParams) error {
	le := binary.LittleEndian
	const logicalSector = 512
	// (A) file identifier.
	id := make([]byte, 8+2*len(creator))
	copy(id, fileSignature)
	for i, c := range utf16.Encode([]rune(creator)) {
		le.PutUint16(id[8+2*i:], c)
	}
	if _, err := f.WriteAt(id, 0); err != nil {
		return err
	}
	// (B), (C) headers with consecutive sequence numbers.
	h := header{
		Sequence:      uint64(rand.Uint32()),
		FileWriteGUID: newGUID(),
		DataWriteGUID: newGUID(),
		Version:       1,
		LogLength:     uint32(p.logSize),
		LogOffset:     headerSectionEnd,
	}
	for _, off := range []int64{header1Offset, header2Offset} {
		buf := make([]byte, headerCRCSize)
		h.encode(buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			return err
		}
		h.Sequence++
	}
	// (G) the BAT, after the log.
	chunkRatio := int64(maxSectorsPerBlock * logicalSector / p.blockSize)
	entries := batEntryCount(int64(p.size), int64(p.blockSize), chunkRatio)
	batOff := uint64(headerSectionEnd+p.logSize+miB-1) &^ (miB - 1)
	batLen := uint32((uint64(entries)*8 + miB - 1) &^ (miB - 1))
	metaOff := (batOff + uint64(batLen) + miB - 1) &^ (miB - 1)
	dataOff := batOff + uint64(batLen) + 5*miB
	end := dataOff
	if p.fixed {
		end += p.size
	}
	if err := f.Truncate(int64(end)); err != nil {
		return err
	}
	// A regular file reads as zeroes, which is a BAT of NOT_PRESENT
	// entries: only other states need writing.
	if p.fixed || p.zeroState {
		bat := make([]byte, batLen)
		state := uint64(blockNotPresent)
		if p.fixed {
			state = blockFullyPresent
		}
		if p.zeroState {
			state = blockZero
		}
		blocks := (p.size + p.blockSize - 1) / p.blockSize
		for b := range blocks {
			e := state
			if state == blockFullyPresent {
				e |= (dataOff + b*p.blockSize + miB - 1) &^ (miB - 1)
			}
			idx := b + b/uint64(chunkRatio)
			le.PutUint64(bat[8*idx:], e)
		}
		if _, err := f.WriteAt(bat, int64(batOff)); err != nil {
			return err
		}
	}
	// (D), (E) region tables.
	rt := make([]byte, headerBlockSize)
	copy(rt, regionSignature)
	le.PutUint32(rt[8:], 2)
	(&regionEntry{GUID: batGUID, FileOffset: batOff, Length: batLen}).encode(rt[16:])
	(&regionEntry{GUID: metadataGUID, FileOffset: metaOff, Length: miB}).encode(rt[16+regionEntryLen:])
	setChecksum(rt, 4)
	for _, off := range []int64{regionTable1, regionTable2} {
		if _, err := f.WriteAt(rt, off); err != nil {
			return err
		}
	}
	// (H) metadata: the table, then its five items at 64 KiB.
	items := make([]byte, 8+8+16+4+4)
	le.PutUint32(items[0:], uint32(p.blockSize))
	if p.fixed {
		le.PutUint32(items[4:], paramLeaveBlocksAllocated)
	}
	le.PutUint64(items[8:], p.size)
	page83 := newGUID()
	copy(items[16:32], page83[:])
	le.PutUint32(items[32:], logicalSector)
	le.PutUint32(items[36:], logicalSector)
	table := make([]byte, headerBlockSize)
	copy(table, metadataSignature)
	le.PutUint16(table[10:], 5)
	itemOff := uint32(headerBlockSize)
	for i, it := range []struct {
		id    guid
		n     uint32
		flags uint32
	}{
		{fileParamGUID, 8, metaIsRequired},
		{virtualSizeGUID, 8, metaIsRequired | metaIsVirtualDisk},
		{page83GUID, 16, metaIsRequired | metaIsVirtualDisk},
		{logicalSectorGUID, 4, metaIsRequired | metaIsVirtualDisk},
		{physSectorGUID, 4, metaIsRequired | metaIsVirtualDisk},
	} {
		(&metadataEntry{ItemID: it.id, Offset: itemOff, Length: it.n, Flags: it.flags}).encode(table[32+i*metadataEntryLen:])
		itemOff += it.n
	}
	if _, err := f.WriteAt(table, int64(metaOff)); err != nil {
		return err
	}
	if _, err := f.WriteAt(items, int64(metaOff)+headerBlockSize); err != nil {
		return err
	}
	return f.Sync()
}
