package luks

import (
	"bytes"
	"crypto/aes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"

	"github.com/imgfs/imgfs/formats"
)

// TestMain stands a fixed PBKDF2 rate in for the benchmark, so that
// creating an image takes milliseconds: with iter-time=10 every count
// ends at QEMU's minimum of 1000.
func TestMain(m *testing.M) {
	itersPerSecond = func(func() hash.Hash, []byte, []byte, int) (uint64, error) { return 10000, nil }
	os.Exit(m.Run())
}

// memRegion is an in-memory io.ReaderAt/WriterAt.
type memRegion struct{ b []byte }

func (m *memRegion) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m.b[off:]), nil
}

func (m *memRegion) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	return copy(m.b[off:], p), nil
}

// TestXTSMatchesXCrypto checks our XTS, which exists for ESSIV's
// arbitrary tweaks, against x/crypto/xts with plain64 IVs.
func TestXTSMatchesXCrypto(t *testing.T) {
	for _, keyLen := range []int{32, 48, 64} {
		key := bytes.Repeat([]byte{7}, keyLen)
		key[keyLen-1] = 9
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		alg := map[int]string{32: "aes-128", 48: "aes-192", 64: "aes-256"}[keyLen]
		c, err := NewSectorCipher(Spec{CipherAlg: alg, CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256"}, key)
		if err != nil {
			t.Fatal(err)
		}
		plain := make([]byte, 3*SectorSize)
		for i := range plain {
			plain[i] = byte(i * 7)
		}
		want := make([]byte, len(plain))
		for s := range 3 {
			ref.Encrypt(want[s*SectorSize:(s+1)*SectorSize], plain[s*SectorSize:(s+1)*SectorSize], uint64(1<<40+s))
		}
		got := append([]byte(nil), plain...)
		c.Encrypt(got, 1<<40)
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: our XTS differs from x/crypto/xts", alg)
		}
		c.Decrypt(got, 1<<40)
		if !bytes.Equal(got, plain) {
			t.Fatalf("%s: decrypt does not invert encrypt", alg)
		}
	}
}

func TestSectorCipherRoundTrip(t *testing.T) {
	specs := []Spec{
		{CipherAlg: "aes-256", CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256"},
		{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "essiv", IVGenHashAlg: "sha256", HashAlg: "sha1"},
		{CipherAlg: "aes-192", CipherMode: "cbc", IVGenAlg: "plain", HashAlg: "sha512"},
		{CipherAlg: "aes-128", CipherMode: "xts", IVGenAlg: "essiv", IVGenHashAlg: "sha256", HashAlg: "sha256"},
		{CipherAlg: "serpent-192", CipherMode: "xts", IVGenAlg: "essiv", IVGenHashAlg: "md5", HashAlg: "ripemd160"},
		{CipherAlg: "twofish-256", CipherMode: "ctr", IVGenAlg: "plain64", HashAlg: "sha224"},
		{CipherAlg: "cast5-128", CipherMode: "cbc", IVGenAlg: "essiv", IVGenHashAlg: "md5", HashAlg: "md5"},
		{CipherAlg: "cast5-128", CipherMode: "ctr", IVGenAlg: "plain", HashAlg: "sha384"},
	}
	for _, s := range specs {
		n, err := s.keyLen()
		if err != nil {
			t.Fatal(err)
		}
		c, err := NewSectorCipher(s, bytes.Repeat([]byte{3}, n))
		if err != nil {
			t.Fatalf("%+v: %v", s, err)
		}
		plain := bytes.Repeat([]byte("0123456789abcdef"), 2*SectorSize/16+1) // a short last sector
		buf := append([]byte(nil), plain...)
		c.Encrypt(buf, 5)
		if bytes.Equal(buf[:SectorSize], buf[SectorSize:2*SectorSize]) {
			t.Errorf("%+v: equal sectors encrypt equally: the IV ignores the sector", s)
		}
		c.Decrypt(buf, 5)
		if !bytes.Equal(buf, plain) {
			t.Errorf("%+v: round trip differs", s)
		}
	}
}

func TestSpecErrors(t *testing.T) {
	spec := func(alg, mode, ivgen, ivhash, hash string) Spec {
		return Spec{CipherAlg: alg, CipherMode: mode, IVGenAlg: ivgen, IVGenHashAlg: ivhash, HashAlg: hash}
	}
	tests := []struct {
		spec Spec
		want string
	}{
		{spec("des", "cbc", "plain64", "", "sha256"), "Algorithm 'des' not supported"},
		{spec("3des", "xts", "plain64", "", "sha256"), "Algorithm '3des' not supported"},
		{spec("cast5-128", "xts", "plain64", "", "sha256"), "Unsupported cipher mode xts"},
		{spec("aes-256", "xts", "plain65", "", "sha256"), "IV generator 'plain65' not supported"},
		{spec("aes-256", "xts", "essiv", "sha257", "sha256"), "Hash algorithm 'sha257' not supported"},
		{spec("aes-128", "xts", "essiv", "sha1", "sha256"), "No AES cipher with key size 20 available"},
		{spec("serpent-256", "cbc", "essiv", "sha384", "sha256"), "No Serpent cipher with key size 48 available"},
		{spec("twofish-192", "xts", "essiv", "ripemd160", "sha256"), "No Twofish cipher with key size 20 available"},
		{spec("cast5-128", "cbc", "essiv", "sha256", "sha256"), "Cipher cast5-128 not supported with essiv"},
		{spec("aes-256", "xts", "plain64", "", "whirlpool"), "Hash algorithm 'whirlpool' not supported"},
		{spec("aes-192", "cbc", "plain64", "", "sha256"), "Key material of 96000 bytes for aes-192 in mode cbc is not a whole number of sectors, which QEMU cannot encrypt"},
	}
	for _, tc := range tests {
		if err := tc.spec.validateCreate(); err == nil || err.Error() != tc.want {
			t.Errorf("%+v: %v, want %q", tc.spec, err, tc.want)
		}
	}
	for _, ok := range []Spec{
		spec("cast5-128", "cbc", "essiv", "md5", "ripemd160"),
		spec("serpent-128", "xts", "essiv", "sha256", "md5"),
		spec("twofish-256", "ctr", "plain", "", "sha512"),
		spec("aes-192", "xts", "essiv", "sha256", "sha224"),
		spec("serpent-192", "ecb", "plain64", "md5", "sha384"),
	} {
		if err := ok.validate(); err != nil {
			t.Errorf("%+v: %v", ok, err)
		}
	}
}

func TestAFRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, newHash := range []func() hash.Hash{sha1.New, sha256.New} {
		for _, n := range []int{16, 32, 48, 64} {
			key := make([]byte, n)
			random := make([]byte, (Stripes-1)*n)
			for i := range key {
				key[i] = byte(rng.Uint32())
			}
			for i := range random {
				random[i] = byte(rng.Uint32())
			}
			split := afSplit(newHash, key, random, Stripes)
			if got := afMerge(newHash, split, Stripes); !bytes.Equal(got, key) {
				t.Fatalf("merge(split(key)) != key for %d bytes", n)
			}
			split[len(split)/2] ^= 1
			if got := afMerge(newHash, split, Stripes); bytes.Equal(got, key) {
				t.Fatalf("a damaged stripe still yields the key")
			}
		}
	}
}

// formatted returns a header made by Format in memory with password
// "abc", and the region holding it.
func formatted(t *testing.T, spec Spec) (*Header, *memRegion) {
	t.Helper()
	m := &memRegion{}
	h, _, err := Format(m, 0, spec, []byte("abc"), 10)
	if err != nil {
		t.Fatal(err)
	}
	return h, m
}

var defaultSpec = Spec{CipherAlg: "aes-256", CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256"}

func TestFormatUnlock(t *testing.T) {
	h, m := formatted(t, defaultSpec)
	if h.PayloadOffset() != 2068480 || h.Slots[1].KeyOffset*SectorSize != 262144 {
		t.Errorf("layout: payload %d, slot 1 at %d; QEMU puts them at 2068480 and 262144",
			h.PayloadOffset(), h.Slots[1].KeyOffset*SectorSize)
	}
	parsed, err := ParseHeader(m.b)
	if err != nil {
		t.Fatal(err)
	}
	if parsed.Spec != defaultSpec {
		t.Errorf("spec %+v, want %+v", parsed.Spec, defaultSpec)
	}
	if _, err := parsed.Unlock(m, 0, []byte("abc")); err != nil {
		t.Fatalf("unlock: %v", err)
	}
	_, err = parsed.Unlock(m, 0, []byte("abd"))
	if !errors.Is(err, ErrInvalidPassword) || err.Error() != "Invalid password, cannot unlock any keyslot" {
		t.Fatalf("wrong password: %v", err)
	}
}

// TestParseHeaderErrors corrupts a valid header field by field and
// expects QEMU's messages.
func TestParseHeaderErrors(t *testing.T) {
	_, m := formatted(t, defaultSpec)
	valid := append([]byte(nil), m.b[:HeaderSize]...)
	be := binary.BigEndian
	slot := func(i, field int) int { return 208 + 48*i + field }
	tests := []struct {
		name    string
		corrupt func(b []byte)
		want    string
		kind    error
	}{
		{"magic", func(b []byte) { b[0] = 'X' }, "Volume is not in LUKS format", formats.ErrWrongFormat},
		{"version", func(b []byte) { be.PutUint16(b[6:], 2) }, "LUKS version 2 is not supported", formats.ErrUnsupported},
		{"cipher name", func(b []byte) { copy(b[8:40], strings.Repeat("a", 32)) }, "LUKS header cipher name is not NUL terminated", formats.ErrCorrupt},
		{"payload", func(b []byte) { be.PutUint32(b[104:], 1) }, "LUKS payload is overlapping with the header", formats.ErrCorrupt},
		{"mk iterations", func(b []byte) { be.PutUint32(b[164:], 0) }, "LUKS key iteration count is zero", formats.ErrCorrupt},
		{"stripes", func(b []byte) { be.PutUint32(b[slot(3, 44):], 5) }, "Keyslot 3 is corrupted (stripes 5 != 4000)", formats.ErrCorrupt},
		{"state", func(b []byte) { be.PutUint32(b[slot(2, 0):], 1) }, "Keyslot 2 state (active/disable) is corrupted", formats.ErrCorrupt},
		{"slot iterations", func(b []byte) { be.PutUint32(b[slot(0, 4):], 0) }, "Keyslot 0 iteration count is zero", formats.ErrCorrupt},
		{"slot in header", func(b []byte) { be.PutUint32(b[slot(0, 40):], 1) }, "Keyslot 0 is overlapping with the LUKS header", formats.ErrCorrupt},
		{"slot in payload", func(b []byte) { be.PutUint32(b[slot(7, 40):], 4000) }, "Keyslot 7 is overlapping with the encrypted payload", formats.ErrCorrupt},
		{"slots overlap", func(b []byte) { copy(b[slot(5, 40):slot(5, 44)], b[slot(4, 40):slot(4, 44)]) }, "Keyslots 4 and 5 are overlapping in the header", formats.ErrCorrupt},
		{"cipher", func(b []byte) { copy(b[8:12], "foo\x00") }, "Algorithm 'foo' with key size 32 bytes not supported", formats.ErrUnsupported},
		{"mode", func(b []byte) { copy(b[40:72], "xts\x00") }, "Unexpected cipher mode string format 'xts'", formats.ErrUnsupported},
		{"hash", func(b []byte) { copy(b[72:104], "sha2566\x00") }, "Hash algorithm 'sha2566' not supported", formats.ErrUnsupported},
		{"short", func(b []byte) {}, "Volume is not in LUKS format", formats.ErrWrongFormat},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := append([]byte(nil), valid...)
			tc.corrupt(b)
			if tc.name == "short" {
				b = b[:HeaderSize-1]
			}
			_, err := ParseHeader(b)
			if err == nil || err.Error() != tc.want || !errors.Is(err, tc.kind) {
				t.Fatalf("got %v, want %q (%v)", err, tc.want, tc.kind)
			}
		})
	}
}

// TestUnlockIterationLimit: a header asking for more PBKDF2 iterations
// than MaxIterations is refused before any work.
func TestUnlockIterationLimit(t *testing.T) {
	h, m := formatted(t, defaultSpec)
	h.Slots[0].Iterations = MaxIterations + 1
	if _, err := h.Unlock(m, 0, []byte("abc")); !errors.Is(err, formats.ErrUnsupported) {
		t.Fatalf("slot iterations over the limit: %v", err)
	}
	h.Slots[0].Iterations = 1000
	h.MKDigestIter = MaxIterations + 1
	if _, err := h.Unlock(m, 0, []byte("abc")); !errors.Is(err, formats.ErrUnsupported) {
		t.Fatalf("digest iterations over the limit: %v", err)
	}
}

// FuzzParseHeader: no input makes the parser panic, and what it accepts
// encodes back to the same bytes.
func FuzzParseHeader(f *testing.F) {
	_, m := formatted(&testing.T{}, defaultSpec)
	f.Add(m.b[:HeaderSize])
	_, m = formatted(&testing.T{}, Spec{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "essiv", IVGenHashAlg: "sha256", HashAlg: "sha1"})
	f.Add(m.b[:HeaderSize])
	_, m = formatted(&testing.T{}, Spec{CipherAlg: "cast5-128", CipherMode: "ctr", IVGenAlg: "essiv", IVGenHashAlg: "md5", HashAlg: "ripemd160"})
	f.Add(m.b[:HeaderSize])
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		if !bytes.Equal(h.Encode(), b[:HeaderSize]) {
			t.Fatal("parsed header does not encode to its bytes")
		}
		if h.splitKeySectors()*SectorSize < int64(h.KeyBytes)*Stripes || h.KeyBytes > 64 {
			t.Fatalf("key material of %d bytes per stripe accepted", h.KeyBytes)
		}
		h.Info()
	})
}

func TestRegionSize(t *testing.T) {
	for _, spec := range []Spec{defaultSpec, {CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "plain64", HashAlg: "sha256"}} {
		h, m := formatted(t, spec)
		n, err := RegionSize(spec)
		if err != nil || n != h.PayloadOffset() {
			t.Errorf("%+v: RegionSize %d, %v; Format's payload offset %d", spec, n, err, h.PayloadOffset())
		}
		if int64(len(m.b)) > n {
			t.Errorf("%+v: Format wrote %d bytes, past the region of %d", spec, len(m.b), n)
		}
	}
}

// TestCipherTable: every cipher builds from a key of its length and has
// the block size the table gives it.
func TestCipherTable(t *testing.T) {
	for name, a := range cipherAlgs {
		b, err := a.newBlock(make([]byte, a.keyLen))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if b.BlockSize() != a.blockSize {
			t.Errorf("%s: block size %d, table says %d", name, b.BlockSize(), a.blockSize)
		}
		if got, ok := cipherByHeader(a.family, uint32(a.keyLen)); !ok || got != name {
			t.Errorf("%s: header name %s with %d-byte keys maps to %q", name, a.family, a.keyLen, got)
		}
	}
}
