package luks

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"

	"github.com/imgfs/imgfs/formats"
)

// On-disk constants of LUKS version 1 (the LUKS1 on-disk format
// specification, as QEMU's crypto/block-luks.c writes it).
const (
	// HeaderSize is the size of the binary header.
	HeaderSize = 592
	// NumSlots is the number of key slots.
	NumSlots = 8
	// Stripes is the anti-forensic stripe count; QEMU accepts no other.
	Stripes = 4000
	// keySlotOffset is where QEMU puts the first key material: the
	// header is padded to 4 KiB, and so is each slot's material.
	keySlotOffset  = 4096
	headerSectors  = keySlotOffset / SectorSize
	slotActive     = 0x00AC71F3
	slotDisabled   = 0x0000DEAD
	digestLen      = 20
	saltLen        = 32
	uuidLen        = 40
	nameLen        = 32
	minSlotIters   = 1000
	minDigestIters = 1000
)

// MaxIterations bounds the PBKDF2 iteration counts imgfs runs while
// unlocking. QEMU has no bound; a hostile header could ask for 2^32
// iterations of every slot and hold us for hours. 2^25 is several times
// what QEMU or cryptsetup pick for a 2-second iter-time on current CPUs
// and costs each slot tried tens of seconds at worst.
const MaxIterations = 1 << 25

var magic = []byte("LUKS\xba\xbe")

// KeySlot is one of the header's key slots.
type KeySlot struct {
	Active     uint32 // slotActive or slotDisabled
	Iterations uint32
	Salt       [saltLen]byte
	KeyOffset  uint32 // in sectors from the header
	Stripes    uint32
}

// Header is a parsed LUKS1 header: the on-disk fields and what their
// names mean.
type Header struct {
	diskHeader
	Spec Spec
}

// diskHeader is the binary header as encoding/binary reads it.
type diskHeader struct {
	Magic        [6]byte
	Version      uint16
	CipherName   [nameLen]byte
	CipherMode   [nameLen]byte
	HashSpec     [nameLen]byte
	PayloadOff   uint32 // in sectors from the header
	KeyBytes     uint32
	MKDigest     [digestLen]byte
	MKDigestSalt [saltLen]byte
	MKDigestIter uint32
	UUID         [uuidLen]byte
	Slots        [NumSlots]KeySlot
}

// Probe scores buf: LUKS magic and version 1.
func Probe(buf []byte) int {
	if len(buf) >= 8 && bytes.Equal(buf[:6], magic) && binary.BigEndian.Uint16(buf[6:8]) == 1 {
		return 100
	}
	return 0
}

// ParseHeader decodes and validates a header from its first HeaderSize
// bytes, with QEMU's checks and messages.
func ParseHeader(buf []byte) (*Header, error) {
	if len(buf) < HeaderSize {
		return nil, formats.Errorf(formats.ErrWrongFormat, "Volume is not in LUKS format")
	}
	h := &Header{}
	// Cannot fail: the buffer is long enough and the struct fixed-size.
	binary.Decode(buf, binary.BigEndian, &h.diskHeader)
	if !bytes.Equal(h.Magic[:], magic) {
		return nil, formats.Errorf(formats.ErrWrongFormat, "Volume is not in LUKS format")
	}
	if h.Version != 1 {
		return nil, formats.Errorf(formats.ErrUnsupported, "LUKS version %d is not supported", h.Version)
	}
	for _, s := range []struct {
		field []byte
		what  string
	}{{h.CipherName[:], "cipher name"}, {h.CipherMode[:], "cipher mode"}, {h.HashSpec[:], "hash spec"}} {
		if bytes.IndexByte(s.field, 0) < 0 {
			return nil, formats.Errorf(formats.ErrCorrupt, "LUKS header %s is not NUL terminated", s.what)
		}
	}
	if err := h.check(); err != nil {
		return nil, err
	}
	spec, err := specFromHeader(cstr(h.CipherName[:]), cstr(h.CipherMode[:]), cstr(h.HashSpec[:]), h.KeyBytes)
	if err != nil {
		return nil, err
	}
	h.Spec = spec
	return h, nil
}

// ReadHeader reads and parses the header at base in r.
func ReadHeader(r io.ReaderAt, base int64) (*Header, error) {
	buf := make([]byte, HeaderSize)
	if _, err := r.ReadAt(buf, base); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return ParseHeader(buf)
}

// check is qcrypto_block_luks_check_header: the payload and every slot's
// key material lie apart from each other and from the header.
func (h *Header) check() error {
	if h.PayloadOff < headerSectors {
		return formats.Errorf(formats.ErrCorrupt, "LUKS payload is overlapping with the header")
	}
	if h.MKDigestIter == 0 {
		return formats.Errorf(formats.ErrCorrupt, "LUKS key iteration count is zero")
	}
	for i, s := range h.Slots {
		if s.Stripes != Stripes {
			return formats.Errorf(formats.ErrCorrupt, "Keyslot %d is corrupted (stripes %d != %d)", i, int32(s.Stripes), Stripes)
		}
		if s.Active != slotActive && s.Active != slotDisabled {
			return formats.Errorf(formats.ErrCorrupt, "Keyslot %d state (active/disable) is corrupted", i)
		}
		if s.Active == slotActive && s.Iterations == 0 {
			return formats.Errorf(formats.ErrCorrupt, "Keyslot %d iteration count is zero", i)
		}
		start, n := int64(s.KeyOffset), h.splitKeySectors()
		if start < headerSectors {
			return formats.Errorf(formats.ErrCorrupt, "Keyslot %d is overlapping with the LUKS header", i)
		}
		if start+n > int64(h.PayloadOff) {
			return formats.Errorf(formats.ErrCorrupt, "Keyslot %d is overlapping with the encrypted payload", i)
		}
		for j := i + 1; j < NumSlots; j++ {
			start2 := int64(h.Slots[j].KeyOffset)
			if start < start2+n && start2 < start+n {
				return formats.Errorf(formats.ErrCorrupt, "Keyslots %d and %d are overlapping in the header", i, j)
			}
		}
	}
	return nil
}

// splitKeySectors is the sectors one slot's key material takes, padded
// to the header alignment as QEMU lays slots out.
func (h *Header) splitKeySectors() int64 { return splitKeySectors(int64(h.KeyBytes)) }

func splitKeySectors(keyBytes int64) int64 {
	n := (keyBytes*Stripes + SectorSize - 1) / SectorSize
	return (n + headerSectors - 1) / headerSectors * headerSectors
}

// RegionSize is how many bytes Format writes for spec: the header and
// eight key slots, which is also the payload offset it records. qcow2
// allocates its encryption header region from it.
func RegionSize(spec Spec) (int64, error) {
	n, err := spec.keyLen()
	if err != nil {
		return 0, err
	}
	return (headerSectors + NumSlots*splitKeySectors(int64(n))) * SectorSize, nil
}

// Encode returns the header's HeaderSize bytes.
func (h *Header) Encode() []byte {
	buf := make([]byte, HeaderSize)
	binary.Encode(buf, binary.BigEndian, &h.diskHeader)
	return buf
}

// PayloadOffset is where the encrypted data starts, in bytes from the
// header.
func (h *Header) PayloadOffset() int64 { return int64(h.PayloadOff) * SectorSize }

// Info is the QAPI QCryptoBlockInfoLUKS of the header, members in schema
// order.
func (h *Header) Info() formats.Object {
	slots := make([]any, 0, NumSlots)
	for _, s := range h.Slots {
		o := formats.Object{{Key: "active", Value: s.Active == slotActive}}
		if s.Active == slotActive {
			o = append(o, formats.Member{Key: "iters", Value: int64(s.Iterations)},
				formats.Member{Key: "stripes", Value: int64(s.Stripes)})
		}
		slots = append(slots, append(o, formats.Member{Key: "key-offset", Value: int64(s.KeyOffset) * SectorSize}))
	}
	o := formats.Object{
		{Key: "cipher-alg", Value: h.Spec.CipherAlg},
		{Key: "cipher-mode", Value: h.Spec.CipherMode},
		{Key: "ivgen-alg", Value: h.Spec.IVGenAlg},
	}
	if h.Spec.IVGenHashAlg != "" {
		o = append(o, formats.Member{Key: "ivgen-hash-alg", Value: h.Spec.IVGenHashAlg})
	}
	return append(o,
		formats.Member{Key: "hash-alg", Value: h.Spec.HashAlg},
		formats.Member{Key: "payload-offset", Value: h.PayloadOffset()},
		formats.Member{Key: "master-key-iters", Value: int64(h.MKDigestIter)},
		formats.Member{Key: "uuid", Value: cstr(h.UUID[:])},
		formats.Member{Key: "slots", Value: slots},
	)
}

// cstr returns a NUL-terminated string field.
func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
