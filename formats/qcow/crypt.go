package qcow

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"

	"github.com/imgfs/imgfs/formats"
)

// sectorCipher is QEMU's legacy qcow encryption (crypto/block-qcow.c):
// AES-128-CBC per 512-byte sector, the key the passphrase's first 16
// bytes zero-padded, the IV the guest sector number little-endian
// (plain64). It is weak by design (no key derivation, predictable IVs)
// and is supported to read and write existing images, as QEMU does.
type sectorCipher struct{ block cipher.Block }

// newSectorCipher builds the cipher of the passphrase held by the
// secret the open or create options name, with QEMU's messages.
func newSectorCipher(id string, secrets map[string][]byte) (*sectorCipher, error) {
	if id == "" {
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	pass, ok := secrets[id]
	if !ok {
		return nil, formats.Errorf(formats.ErrInvalidOption, "No secret with id '%s'", id)
	}
	var key [16]byte
	copy(key[:], pass)
	b, err := aes.NewCipher(key[:])
	if err != nil {
		return nil, err
	}
	return &sectorCipher{block: b}, nil
}

// iv is the plain64 IV of the sector at guest offset off.
func iv(off int64) []byte {
	v := make([]byte, aes.BlockSize)
	binary.LittleEndian.PutUint64(v, uint64(off/512))
	return v
}

// decrypt decrypts buf, whole sectors from guest offset off, in place.
func (c *sectorCipher) decrypt(buf []byte, off int64) {
	for i := 0; i+512 <= len(buf); i += 512 {
		cipher.NewCBCDecrypter(c.block, iv(off+int64(i))).CryptBlocks(buf[i:i+512], buf[i:i+512])
	}
}

// encrypt encrypts buf, whole sectors from guest offset off, in place.
func (c *sectorCipher) encrypt(buf []byte, off int64) {
	for i := 0; i+512 <= len(buf); i += 512 {
		cipher.NewCBCEncrypter(c.block, iv(off+int64(i))).CryptBlocks(buf[i:i+512], buf[i:i+512])
	}
}
