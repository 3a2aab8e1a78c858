package luks

import (
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"runtime"

	"golang.org/x/crypto/pbkdf2"
	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
)

// ErrInvalidPassword: no key slot opens with the passphrase given.
var ErrInvalidPassword = errors.New("invalid LUKS password")

// Unlock finds the key slot that password opens, reading key material
// from r, where the header starts at base, and returns the cipher of the
// master key it recovers, as qcrypto_block_luks_find_key does.
func (h *Header) Unlock(r io.ReaderAt, base int64, password []byte) (*SectorCipher, error) {
	if err := h.checkDigestIters(); err != nil {
		return nil, err
	}
	for i := range h.Slots {
		mk, err := h.openSlot(r, base, i, password)
		if err != nil {
			return nil, err
		}
		if mk != nil {
			return NewSectorCipher(h.Spec, mk)
		}
	}
	return nil, &formats.Error{Msg: "Invalid password, cannot unlock any keyslot", Kind: ErrInvalidPassword}
}

func (h *Header) checkDigestIters() error {
	if h.MKDigestIter > MaxIterations {
		return fmt.Errorf("LUKS master key digest iterations %d exceed imgfs's limit %d: %w", h.MKDigestIter, MaxIterations, formats.ErrUnsupported)
	}
	return nil
}

// openSlot is qcrypto_block_luks_load_key: the master key key slot i
// yields for password, or nil when the slot is inactive or password
// does not open it.
func (h *Header) openSlot(r io.ReaderAt, base int64, i int, password []byte) ([]byte, error) {
	s := h.Slots[i]
	if s.Active != slotActive {
		return nil, nil
	}
	if s.Iterations > MaxIterations {
		return nil, fmt.Errorf("LUKS key slot %d iterations %d exceed imgfs's limit %d: %w", i, s.Iterations, MaxIterations, formats.ErrUnsupported)
	}
	newHash, err := lookupHash(h.Spec.HashAlg)
	if err != nil {
		return nil, err
	}
	mk, err := h.slotKey(r, base, s, password, newHash)
	if err != nil {
		return nil, fmt.Errorf("LUKS key slot %d: %w", i, err)
	}
	digest := pbkdf2.Key(mk, h.MKDigestSalt[:], int(h.MKDigestIter), digestLen, newHash)
	if subtle.ConstantTimeCompare(digest, h.MKDigest[:]) != 1 {
		return nil, nil
	}
	return mk, nil
}

// slotKey derives the candidate master key slot s yields for password:
// the password's PBKDF2 key decrypts the slot's stripes, which merge into
// the master key.
func (h *Header) slotKey(r io.ReaderAt, base int64, s KeySlot, password []byte, newHash func() hash.Hash) ([]byte, error) {
	n := int(h.KeyBytes)
	slotKey := pbkdf2.Key(password, s.Salt[:], int(s.Iterations), n, newHash)
	c, err := NewSectorCipher(h.Spec, slotKey)
	if err != nil {
		return nil, err
	}
	// KeyBytes is at most 64 (ParseHeader accepts no longer keys), so
	// this is at most 256000 bytes.
	split := make([]byte, n*Stripes)
	if _, err := r.ReadAt(split, base+int64(s.KeyOffset)*SectorSize); err != nil {
		return nil, fmt.Errorf("reading key material at sector %d: %w", s.KeyOffset, err)
	}
	c.Decrypt(split, 0)
	return afMerge(newHash, split, Stripes), nil
}

// storeKey is qcrypto_block_luks_store_key: it puts master key mk into
// key slot i, opened by password with iterations benchmarked to cost
// iterTime milliseconds, writing the key material and then the header.
func (h *Header) storeKey(w io.WriterAt, base int64, i int, password, mk []byte, iterTime uint64) error {
	newHash, err := lookupHash(h.Spec.HashAlg)
	if err != nil {
		return err
	}
	slot := &h.Slots[i]
	rand.Read(slot.Salt[:])
	keyLen := int(h.KeyBytes)
	iters, err := scaledIters(newHash, password, keyLen, iterTime)
	if err != nil {
		return err
	}
	slot.Iterations = uint32(max(iters, minSlotIters))
	slotCipher, err := NewSectorCipher(h.Spec, pbkdf2.Key(password, slot.Salt[:], int(slot.Iterations), keyLen, newHash))
	if err != nil {
		return err
	}
	random := make([]byte, (Stripes-1)*keyLen)
	rand.Read(random)
	split := afSplit(newHash, mk, random, Stripes)
	slotCipher.Encrypt(split, 0)
	if _, err := w.WriteAt(split, base+int64(slot.KeyOffset)*SectorSize); err != nil {
		return err
	}
	slot.Active = slotActive
	return h.store(w, base)
}

// store writes the header.
func (h *Header) store(w io.WriterAt, base int64) error {
	_, err := w.WriteAt(h.Encode(), base)
	return err
}

// DefaultIterTime is QEMU's default iter-time: the milliseconds of PBKDF2
// a key slot costs to open.
const DefaultIterTime = 2000

// Format writes a new LUKS header with spec to w at base, with key slot 0
// opened by password, as qcrypto_block_luks_create does: PBKDF2 iteration
// counts are benchmarked so that opening takes iterTime milliseconds. It
// returns the header (whose PayloadOffset tells where the data starts)
// and the master key's cipher.
func Format(w io.WriterAt, base int64, spec Spec, password []byte, iterTime uint64) (*Header, *SectorCipher, error) {
	if err := spec.validateCreate(); err != nil {
		return nil, nil, err
	}
	newHash, _ := lookupHash(spec.HashAlg)
	keyLen, _ := spec.keyLen()
	h := &Header{Spec: spec}
	copy(h.Magic[:], magic)
	h.Version = 1
	name, mode, hashSpec := spec.headerNames()
	copy(h.CipherName[:], name)
	copy(h.CipherMode[:], mode)
	copy(h.HashSpec[:], hashSpec)
	h.KeyBytes = uint32(keyLen)
	mk := make([]byte, keyLen)
	rand.Read(mk)
	rand.Read(h.MKDigestSalt[:])
	copy(h.UUID[:], newUUID())

	iters, err := scaledIters(newHash, mk, digestLen, iterTime)
	if err != nil {
		return nil, nil, err
	}
	// cryptsetup and QEMU divide by 8 so that trying all eight slots'
	// digests costs about the iter-time.
	h.MKDigestIter = uint32(max(iters/8, minDigestIters))
	copy(h.MKDigest[:], pbkdf2.Key(mk, h.MKDigestSalt[:], int(h.MKDigestIter), digestLen, newHash))

	splitSectors := h.splitKeySectors()
	for i := range h.Slots {
		h.Slots[i] = KeySlot{Active: slotDisabled, Stripes: Stripes,
			KeyOffset: uint32(headerSectors + int64(i)*splitSectors)}
	}
	region, _ := RegionSize(spec)
	h.PayloadOff = uint32(region / SectorSize)

	if err := h.storeKey(w, base, 0, password, mk, iterTime); err != nil {
		return nil, nil, err
	}
	c, err := NewSectorCipher(spec, mk)
	return h, c, err
}

// scaledIters benchmarks PBKDF2 of secret into outLen
// bytes and scales the iterations per second to iterTime milliseconds,
// as QEMU does before it refuses counts that do not fit the header.
func scaledIters(newHash func() hash.Hash, secret []byte, outLen int, iterTime uint64) (uint64, error) {
	salt := make([]byte, saltLen)
	perSec, err := itersPerSecond(newHash, secret, salt, outLen)
	if err != nil {
		return 0, err
	}
	if iterTime != 0 && perSec > math.MaxUint64/iterTime {
		return 0, formats.Errorf(formats.ErrInvalidOption, "PBKDF iterations %d too large to scale", perSec)
	}
	iters := perSec * iterTime / 1000
	if iters > math.MaxUint32 {
		return 0, formats.Errorf(formats.ErrInvalidOption, "PBKDF iterations %d larger than %d", iters, uint32(math.MaxUint32))
	}
	return iters, nil
}

// itersPerSecond is countIters; tests replace it with a fixed rate, as
// the benchmark costs a second or more of CPU per key.
var itersPerSecond = countIters

// countIters measures how many PBKDF2 iterations run in a second of
// this thread's CPU time, as qcrypto_pbkdf2_count_iters does: grow the
// trial until one takes over half a second, then extrapolate.
func countIters(newHash func() hash.Hash, secret, salt []byte, outLen int) (uint64, error) {
	// Thread CPU time is only meaningful while we stay on one thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	iters := uint64(1 << 15)
	for {
		start, err := threadCPUMillis()
		if err != nil {
			return 0, err
		}
		pbkdf2.Key(secret, salt, int(iters), outLen, newHash)
		end, err := threadCPUMillis()
		if err != nil {
			return 0, err
		}
		switch delta := end - start; {
		case delta == 0:
			iters *= 2
		case delta > 500:
			return iters * 1000 / delta, nil
		case delta < 100:
			iters *= 10
		default:
			iters = iters * 1000 / delta
		}
	}
}

func threadCPUMillis() (uint64, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, fmt.Errorf("Unable to calculate thread CPU usage: %w", formats.ErrnoError{Err: err})
	}
	return uint64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6, nil
}

// newUUID returns a random (version 4) UUID in its text form.
func newUUID() string {
	var u [16]byte
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
