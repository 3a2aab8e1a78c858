package luks

import (
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

	"github.com/imgfs/imgfs/formats"
)

// SectorSize is the unit LUKS encrypts: each 512-byte sector has its own
// IV, derived from its sector number.
const SectorSize = 512

// hashAlgs are the hash algorithms imgfs can use for PBKDF2, the
// anti-forensic splitter and ESSIV, by their QAPI (and LUKS header) names.
var hashAlgs = map[string]func() hash.Hash{
	"md5":    md5.New,
	"sha1":   sha1.New,
	"sha224": sha256.New224,
	"sha256": sha256.New,
	"sha384": sha512.New384,
	"sha512": sha512.New,
}

func lookupHash(name string) (func() hash.Hash, error) {
	h, ok := hashAlgs[name]
	if !ok {
		return nil, formats.Errorf(formats.ErrUnsupported, "Hash algorithm '%s' not supported", name)
	}
	return h, nil
}

// Spec names a LUKS encryption scheme with QAPI's names, as `qemu-img
// create -o` takes them and `info` shows them.
type Spec struct {
	CipherAlg    string // aes-128, aes-192, aes-256
	CipherMode   string // xts, cbc
	IVGenAlg     string // plain, plain64, essiv
	IVGenHashAlg string // the ESSIV hash; "" for the other generators
	HashAlg      string // PBKDF2 and anti-forensic hash
}

// keyLen is the master key length the spec needs: XTS takes two keys.
func (s Spec) keyLen() (int, error) {
	var n int
	switch s.CipherAlg {
	case "aes-128":
		n = 16
	case "aes-192":
		n = 24
	case "aes-256":
		n = 32
	default:
		return 0, formats.Errorf(formats.ErrUnsupported, "Cipher algorithm '%s' not supported", s.CipherAlg)
	}
	switch s.CipherMode {
	case "xts":
		return 2 * n, nil
	case "cbc":
		return n, nil
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
	return strings.SplitN(s.CipherAlg, "-", 2)[0], mode, s.HashAlg
}

// specFromHeader maps the header's names back to a Spec, as
// qcrypto_block_luks_parse_header does; keyBytes picks the AES variant.
func specFromHeader(name, mode, hashSpec string, keyBytes uint32) (Spec, error) {
	s := Spec{HashAlg: hashSpec}
	m, ivgen, ok := strings.Cut(mode, "-")
	if !ok {
		return s, formats.Errorf(formats.ErrUnsupported, "Unexpected cipher mode string format '%s'", mode)
	}
	s.CipherMode = m
	ivgen, ivHash, hasHash := strings.Cut(ivgen, ":")
	s.IVGenAlg, s.IVGenHashAlg = ivgen, ivHash
	if hasHash && ivHash == "" {
		return s, formats.Errorf(formats.ErrUnsupported, "Hash algorithm '' not supported")
	}
	aesBytes := keyBytes
	if m == "xts" {
		aesBytes /= 2
	}
	if name != "aes" || (aesBytes != 16 && aesBytes != 24 && aesBytes != 32) {
		return s, formats.Errorf(formats.ErrUnsupported, "Algorithm '%s' with key size %d bytes not supported", name, aesBytes)
	}
	s.CipherAlg = fmt.Sprintf("aes-%d", aesBytes*8)
	if err := s.validate(); err != nil {
		return s, err
	}
	if s.IVGenAlg != "essiv" {
		// QEMU's header may name a hash for other generators, which
		// ignore it, and so does info.
		s.IVGenHashAlg = ""
	}
	return s, nil
}

// validate checks that imgfs can run every algorithm s names, in the
// order qcrypto_block_luks_parse_header looks them up.
func (s Spec) validate() error {
	if _, err := s.keyLen(); err != nil {
		return err
	}
	if s.IVGenHashAlg != "" || s.IVGenAlg == "essiv" {
		newHash, err := lookupHash(s.IVGenHashAlg)
		if err != nil {
			return err
		}
		// ESSIV keys AES with the digest, so it must be an AES key length.
		if n := newHash().Size(); s.IVGenAlg == "essiv" && n != 16 && n != 24 && n != 32 {
			return formats.Errorf(formats.ErrUnsupported, "No AES cipher with key size %d available", n)
		}
	}
	switch s.IVGenAlg {
	case "plain", "plain64", "essiv":
	default:
		return formats.Errorf(formats.ErrUnsupported, "IV generator '%s' not supported", s.IVGenAlg)
	}
	_, err := lookupHash(s.HashAlg)
	return err
}

// SectorCipher encrypts and decrypts whole 512-byte sectors with a key
// and the spec's IV generator. It is safe for concurrent use.
type SectorCipher struct {
	mode  string
	block cipher.Block // data cipher (the first half of the key with XTS)
	tweak cipher.Block // XTS tweak cipher, nil for CBC
	ivgen string
	essiv cipher.Block // ESSIV IV cipher, keyed with hash(key)
}

// NewSectorCipher makes the cipher of spec s keyed with key, which must
// be s's key length.
func NewSectorCipher(s Spec, key []byte) (*SectorCipher, error) {
	n, err := s.keyLen()
	if err != nil {
		return nil, err
	}
	if len(key) != n {
		return nil, fmt.Errorf("LUKS key of %d bytes, %s-%s needs %d: %w", len(key), s.CipherAlg, s.CipherMode, n, formats.ErrInvalidOption)
	}
	c := &SectorCipher{mode: s.CipherMode, ivgen: s.IVGenAlg}
	dataKey := key
	if s.CipherMode == "xts" {
		dataKey = key[:n/2]
		if c.tweak, err = aes.NewCipher(key[n/2:]); err != nil {
			return nil, err
		}
	}
	if c.block, err = aes.NewCipher(dataKey); err != nil {
		return nil, err
	}
	if s.IVGenAlg == "essiv" {
		// ESSIV encrypts the sector number with AES keyed by the hash of
		// the whole key; the AES variant follows the digest length.
		newHash, err := lookupHash(s.IVGenHashAlg)
		if err != nil {
			return nil, err
		}
		h := newHash()
		h.Write(key)
		// validate has checked that the digest is an AES key length.
		if c.essiv, err = aes.NewCipher(h.Sum(nil)); err != nil {
			return nil, fmt.Errorf("ESSIV with %s: %w: %v", s.IVGenHashAlg, formats.ErrUnsupported, err)
		}
	}
	return c, nil
}

// iv computes the IV of sector n.
func (c *SectorCipher) iv(iv *[aes.BlockSize]byte, n uint64) {
	*iv = [aes.BlockSize]byte{}
	switch c.ivgen {
	case "plain":
		binary.LittleEndian.PutUint32(iv[:], uint32(n))
	case "plain64":
		binary.LittleEndian.PutUint64(iv[:], n)
	case "essiv":
		binary.LittleEndian.PutUint64(iv[:], n)
		c.essiv.Encrypt(iv[:], iv[:])
	}
}

// Encrypt encrypts buf in place; buf holds sectors, the first of which
// has the number sector. The last may be short (key material of AES-192
// keys), but every length is a multiple of the AES block.
func (c *SectorCipher) Encrypt(buf []byte, sector uint64) { c.crypt(buf, sector, true) }

// Decrypt decrypts buf in place, as Encrypt.
func (c *SectorCipher) Decrypt(buf []byte, sector uint64) { c.crypt(buf, sector, false) }

func (c *SectorCipher) crypt(buf []byte, sector uint64, encrypt bool) {
	var iv [aes.BlockSize]byte
	for off := 0; off < len(buf); off, sector = off+SectorSize, sector+1 {
		s := buf[off:min(off+SectorSize, len(buf))]
		c.iv(&iv, sector)
		switch {
		case c.mode == "xts":
			xtsSector(c.block, c.tweak, s, iv, encrypt)
		case encrypt:
			cipher.NewCBCEncrypter(c.block, iv[:]).CryptBlocks(s, s)
		default:
			cipher.NewCBCDecrypter(c.block, iv[:]).CryptBlocks(s, s)
		}
	}
}

// xtsSector runs XTS (IEEE 1619) over one sector whose length is a
// multiple of the block size, so no ciphertext stealing is needed.
// x/crypto/xts takes only a 64-bit sector number as the tweak; ESSIV
// needs an arbitrary 16-byte one, hence this small implementation.
func xtsSector(data, tweakCipher cipher.Block, s []byte, iv [aes.BlockSize]byte, encrypt bool) {
	var t [aes.BlockSize]byte
	tweakCipher.Encrypt(t[:], iv[:])
	for i := 0; i < len(s); i += aes.BlockSize {
		b := s[i : i+aes.BlockSize]
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
