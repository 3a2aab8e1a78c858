package luks

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
	"strings"

	"golang.org/x/crypto/cast5"
	"golang.org/x/crypto/ripemd160"
	"golang.org/x/crypto/twofish"

	"github.com/imgfs/imgfs/formats"
)

// SectorSize is the unit LUKS encrypts: each 512-byte sector has its own
// IV, derived from its sector number.
const SectorSize = 512

// hashAlgs are the hash algorithms imgfs can use for PBKDF2, the
// anti-forensic splitter and ESSIV, by their QAPI (and LUKS header) names.
var hashAlgs = map[string]func() hash.Hash{
	"md5":       md5.New,
	"sha1":      sha1.New,
	"sha224":    sha256.New224,
	"sha256":    sha256.New,
	"sha384":    sha512.New384,
	"sha512":    sha512.New,
	"ripemd160": ripemd160.New,
}

func lookupHash(name string) (func() hash.Hash, error) {
	h, ok := hashAlgs[name]
	if !ok {
		return nil, formats.Errorf(formats.ErrUnsupported, "Hash algorithm '%s' not supported", name)
	}
	return h, nil
}

// cipherAlg is a block cipher LUKS can name: the header's cipher name
// (its family), the key and block lengths and the constructor.
type cipherAlg struct {
	family    string
	keyLen    int
	blockSize int
	newBlock  func(key []byte) (cipher.Block, error)
}

func newCAST5(key []byte) (cipher.Block, error)   { return cast5.NewCipher(key) }
func newTwofish(key []byte) (cipher.Block, error) { return twofish.NewCipher(key) }

// cipherAlgs are the QAPI cipher algorithms QEMU's LUKS driver maps to
// header names (qcrypto_block_luks_cipher_name_map); des and 3des are
// valid QAPI names that it refuses.
var cipherAlgs = map[string]cipherAlg{
	"aes-128":     {"aes", 16, aes.BlockSize, aes.NewCipher},
	"aes-192":     {"aes", 24, aes.BlockSize, aes.NewCipher},
	"aes-256":     {"aes", 32, aes.BlockSize, aes.NewCipher},
	"cast5-128":   {"cast5", 16, cast5.BlockSize, newCAST5},
	"serpent-128": {"serpent", 16, serpentBlockSize, newSerpent},
	"serpent-192": {"serpent", 24, serpentBlockSize, newSerpent},
	"serpent-256": {"serpent", 32, serpentBlockSize, newSerpent},
	"twofish-128": {"twofish", 16, twofish.BlockSize, newTwofish},
	"twofish-192": {"twofish", 24, twofish.BlockSize, newTwofish},
	"twofish-256": {"twofish", 32, twofish.BlockSize, newTwofish},
}

func lookupCipher(name string) (cipherAlg, error) {
	a, ok := cipherAlgs[name]
	if !ok {
		return a, formats.Errorf(formats.ErrUnsupported, "Algorithm '%s' not supported", name)
	}
	return a, nil
}

// cipherByHeader returns the QAPI name of the cipher a header names with
// a key of keyBytes (per XTS half), as qcrypto_block_luks_cipher_name_lookup.
func cipherByHeader(family string, keyBytes uint32) (string, bool) {
	for name, a := range cipherAlgs {
		if a.family == family && uint32(a.keyLen) == keyBytes {
			return name, true
		}
	}
	return "", false
}

// Spec names a LUKS encryption scheme with QAPI's names, as `qemu-img
// create -o` takes them and `info` shows them.
type Spec struct {
	CipherAlg    string // aes-256, serpent-128, cast5-128, ...
	CipherMode   string // xts, cbc, ecb, ctr
	IVGenAlg     string // plain, plain64, essiv
	IVGenHashAlg string // the ESSIV hash; "" for the other generators
	HashAlg      string // PBKDF2 and anti-forensic hash
}

// keyLen is the master key length the spec needs: XTS takes two keys.
func (s Spec) keyLen() (int, error) {
	a, err := lookupCipher(s.CipherAlg)
	if err != nil {
		return 0, err
	}
	switch s.CipherMode {
	case "xts":
		return 2 * a.keyLen, nil
	case "cbc", "ecb", "ctr":
		return a.keyLen, nil
	}
	return 0, formats.Errorf(formats.ErrUnsupported, "Cipher mode '%s' not supported", s.CipherMode)
}

// headerNames returns the cipher name, cipher mode and hash spec the LUKS
// header stores for s ("aes", "xts-plain64", "sha256").
func (s Spec) headerNames() (name, mode, hashSpec string) {
	mode = s.CipherMode + "-" + s.IVGenAlg
	if s.IVGenHashAlg != "" {
		mode += ":" + s.IVGenHashAlg
	}
	return cipherAlgs[s.CipherAlg].family, mode, s.HashAlg
}

// specFromHeader maps the header's names back to a Spec, with the
// lookups in qcrypto_block_luks_parse_header's order; keyBytes picks
// the cipher's key size.
func specFromHeader(name, mode, hashSpec string, keyBytes uint32) (Spec, error) {
	s := Spec{HashAlg: hashSpec}
	m, ivgen, ok := strings.Cut(mode, "-")
	if !ok {
		return s, formats.Errorf(formats.ErrUnsupported, "Unexpected cipher mode string format '%s'", mode)
	}
	ivgen, ivHash, hasHash := strings.Cut(ivgen, ":")
	s.CipherMode, s.IVGenAlg, s.IVGenHashAlg = m, ivgen, ivHash
	if hasHash {
		if _, err := lookupHash(ivHash); err != nil {
			return s, err
		}
	}
	switch m {
	case "xts":
		keyBytes /= 2
	case "cbc", "ecb", "ctr":
	default:
		return s, formats.Errorf(formats.ErrUnsupported, "Cipher mode '%s' not supported", m)
	}
	alg, ok := cipherByHeader(name, keyBytes)
	if !ok {
		return s, formats.Errorf(formats.ErrUnsupported, "Algorithm '%s' with key size %d bytes not supported", name, keyBytes)
	}
	s.CipherAlg = alg
	if _, err := lookupHash(hashSpec); err != nil {
		return s, err
	}
	if err := checkIVGen(ivgen); err != nil {
		return s, err
	}
	if ivgen == "essiv" && !hasHash {
		return s, formats.Errorf(formats.ErrUnsupported, "Missing IV generator hash specification")
	}
	if ivgen != "essiv" {
		// QEMU's header may name a hash for other generators, which
		// ignore it, and so does info.
		s.IVGenHashAlg = ""
	}
	return s, s.validate()
}

func checkIVGen(name string) error {
	switch name {
	case "plain", "plain64", "essiv":
		return nil
	}
	return formats.Errorf(formats.ErrUnsupported, "IV generator '%s' not supported", name)
}

// essivCipher is the cipher ESSIV encrypts sector numbers with: the data
// cipher's family with the ESSIV hash's digest as key, as dm-crypt and
// qcrypto_block_luks_essiv_cipher choose it.
func (s Spec) essivCipher() (string, error) {
	newHash, err := lookupHash(s.IVGenHashAlg)
	if err != nil {
		return "", err
	}
	a, err := lookupCipher(s.CipherAlg)
	if err != nil {
		return "", err
	}
	n := newHash().Size()
	if n == a.keyLen {
		return s.CipherAlg, nil
	}
	title := map[string]string{"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}[a.family]
	if title == "" {
		return "", formats.Errorf(formats.ErrUnsupported, "Cipher %s not supported with essiv", s.CipherAlg)
	}
	if name, ok := cipherByHeader(a.family, uint32(n)); ok {
		return name, nil
	}
	return "", formats.Errorf(formats.ErrUnsupported, "No %s cipher with key size %d available", title, n)
}

// validate checks that every algorithm s names exists, in the order
// qcrypto_block_luks_create meets them.
func (s Spec) validate() error {
	if _, err := lookupCipher(s.CipherAlg); err != nil {
		return err
	}
	if err := checkIVGen(s.IVGenAlg); err != nil {
		return err
	}
	if s.IVGenAlg == "essiv" {
		if _, err := s.essivCipher(); err != nil {
			return err
		}
	} else if s.IVGenHashAlg != "" {
		if _, err := lookupHash(s.IVGenHashAlg); err != nil {
			return err
		}
	}
	if _, err := s.keyLen(); err != nil {
		return err
	}
	_, err := lookupHash(s.HashAlg)
	return err
}

// validateCreate adds to validate what formatting a volume with s needs:
// a cipher that can run the mode (as QEMU finds when it sets the cipher
// up, before it benchmarks PBKDF2), and key material that fills whole
// sectors. QEMU 7.2 fails an assertion and aborts on key material of
// 192-bit keys outside XTS (24 * 4000 bytes); imgfs refuses to make such
// an image, which QEMU could not open either.
func (s Spec) validateCreate() error {
	if err := s.validate(); err != nil {
		return err
	}
	if err := s.checkMode(); err != nil {
		return err
	}
	if n, _ := s.keyLen(); n*Stripes%SectorSize != 0 {
		return formats.Errorf(formats.ErrUnsupported, "Key material of %d bytes for %s in mode %s is not a whole number of sectors, which QEMU cannot encrypt",
			n*Stripes, s.CipherAlg, s.CipherMode)
	}
	return nil
}

// checkMode refuses XTS with a cipher whose block is not 16 bytes, as
// QEMU's nettle backend does.
func (s Spec) checkMode() error {
	if s.CipherMode == "xts" && cipherAlgs[s.CipherAlg].blockSize != 16 {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported cipher mode xts")
	}
	return nil
}

// SectorCipher encrypts and decrypts whole 512-byte sectors with a key
// and the spec's IV generator. It is safe for concurrent use.
type SectorCipher struct {
	mode  string
	block cipher.Block // data cipher (the first half of the key with XTS)
	tweak cipher.Block // XTS tweak cipher, nil for the other modes
	ivLen int          // QEMU's niv: the block size, 0 for ECB
	ivgen string
	essiv cipher.Block // ESSIV IV cipher, keyed with hash(key)
	// key is the key itself: the master key, which amend puts into new
	// key slots.
	key []byte
}

// NewSectorCipher makes the cipher of spec s keyed with key, which must
// be s's key length.
func NewSectorCipher(s Spec, key []byte) (*SectorCipher, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if err := s.checkMode(); err != nil {
		return nil, err
	}
	n, _ := s.keyLen()
	if len(key) != n {
		return nil, fmt.Errorf("LUKS key of %d bytes, %s-%s needs %d: %w", len(key), s.CipherAlg, s.CipherMode, n, formats.ErrInvalidOption)
	}
	a := cipherAlgs[s.CipherAlg]
	c := &SectorCipher{mode: s.CipherMode, ivgen: s.IVGenAlg, key: bytes.Clone(key)}
	dataKey := key
	var err error
	if s.CipherMode == "xts" {
		dataKey = key[:n/2]
		if c.tweak, err = a.newBlock(key[n/2:]); err != nil {
			return nil, err
		}
	}
	if c.block, err = a.newBlock(dataKey); err != nil {
		return nil, err
	}
	if s.CipherMode != "ecb" {
		c.ivLen = a.blockSize
	}
	if s.IVGenAlg == "essiv" {
		// ESSIV encrypts the sector number with a cipher keyed by the
		// hash of the whole key; validate has checked both exist.
		name, _ := s.essivCipher()
		newHash, _ := lookupHash(s.IVGenHashAlg)
		h := newHash()
		h.Write(key)
		if c.essiv, err = cipherAlgs[name].newBlock(h.Sum(nil)); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// maxBlock is the largest cipher block (and so IV) LUKS ciphers have.
const maxBlock = 16

// iv computes the IV of sector n into iv, ivLen bytes, as QEMU's IV
// generators do: the sector number little-endian (truncated to 32 bits
// by plain), zero-padded, and for ESSIV encrypted.
func (c *SectorCipher) iv(iv []byte, n uint64) {
	clear(iv)
	var le [8]byte
	switch c.ivgen {
	case "plain":
		binary.LittleEndian.PutUint32(le[:], uint32(n))
	default:
		binary.LittleEndian.PutUint64(le[:], n)
	}
	if c.ivgen != "essiv" {
		copy(iv, le[:])
		return
	}
	var data [maxBlock]byte
	bs := c.essiv.BlockSize()
	copy(data[:bs], le[:])
	c.essiv.Encrypt(data[:bs], data[:bs])
	copy(iv, data[:bs])
}

// Encrypt encrypts buf in place; buf holds sectors, the first of which
// has the number sector. The last may be short (key material of 192-bit
// keys), but every length is a multiple of the cipher block.
func (c *SectorCipher) Encrypt(buf []byte, sector uint64) { c.crypt(buf, sector, true) }

// Decrypt decrypts buf in place, as Encrypt.
func (c *SectorCipher) Decrypt(buf []byte, sector uint64) { c.crypt(buf, sector, false) }

func (c *SectorCipher) crypt(buf []byte, sector uint64, encrypt bool) {
	var ivBuf [maxBlock]byte
	iv := ivBuf[:c.ivLen]
	for off := 0; off < len(buf); off, sector = off+SectorSize, sector+1 {
		s := buf[off:min(off+SectorSize, len(buf))]
		if c.ivLen > 0 {
			c.iv(iv, sector)
		}
		switch {
		case c.mode == "xts":
			xtsSector(c.block, c.tweak, s, iv, encrypt)
		case c.mode == "ctr":
			cipher.NewCTR(c.block, iv).XORKeyStream(s, s)
		case c.mode == "ecb":
			ecbSector(c.block, s, encrypt)
		case encrypt:
			cipher.NewCBCEncrypter(c.block, iv).CryptBlocks(s, s)
		default:
			cipher.NewCBCDecrypter(c.block, iv).CryptBlocks(s, s)
		}
	}
}

func ecbSector(b cipher.Block, s []byte, encrypt bool) {
	bs := b.BlockSize()
	for i := 0; i < len(s); i += bs {
		if encrypt {
			b.Encrypt(s[i:i+bs], s[i:i+bs])
		} else {
			b.Decrypt(s[i:i+bs], s[i:i+bs])
		}
	}
}

// xtsSector runs XTS (IEEE 1619) over one sector whose length is a
// multiple of the 16-byte block, so no ciphertext stealing is needed.
// x/crypto/xts takes only a 64-bit sector number as the tweak and only
// AES-like ciphers by constructor; ESSIV needs an arbitrary 16-byte
// tweak, hence this small implementation.
func xtsSector(data, tweakCipher cipher.Block, s, iv []byte, encrypt bool) {
	var t [16]byte
	tweakCipher.Encrypt(t[:], iv)
	for i := 0; i < len(s); i += len(t) {
		b := s[i : i+len(t)]
		xorInto(b, t[:])
		if encrypt {
			data.Encrypt(b, b)
		} else {
			data.Decrypt(b, b)
		}
		xorInto(b, t[:])
		// Multiply the tweak by x in GF(2^128), little-endian as XTS
		// defines it.
		carry := t[15] >> 7
		for j := 15; j > 0; j-- {
			t[j] = t[j]<<1 | t[j-1]>>7
		}
		t[0] = t[0]<<1 ^ 0x87*carry
	}
}
