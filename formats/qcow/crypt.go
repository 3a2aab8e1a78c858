package qcow

import (
	"bytes"
	"strings"
	"unicode/utf8"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
)

// NewLegacyCipher is QEMU's legacy qcow encryption (crypto/block-qcow.c),
// which qcow2's crypt_method 1 uses too: AES-128-CBC per 512-byte
// sector, the IV the sector number little-endian (plain64), the key the
// passphrase's first 16 bytes zero-padded, without key derivation. It
// is weak by design and supported, as in qemu-img, to read, write and
// create such images. id names the secret in secrets holding the
// passphrase; the errors are QEMU's.
func NewLegacyCipher(id string, secrets map[string][]byte) (*luks.SectorCipher, error) {
	if id == "" {
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	pass, ok := secrets[id]
	if !ok {
		return nil, formats.Errorf(formats.ErrInvalidOption, "No secret with id '%s'", id)
	}
	// QEMU reads the passphrase as a C string
	// (qcrypto_secret_lookup_as_utf8), so a NUL byte is refused too.
	if !utf8.Valid(pass) || bytes.IndexByte(pass, 0) >= 0 {
		return nil, formats.Errorf(formats.ErrInvalidOption, "Data from secret %s is not valid UTF-8", id)
	}
	key := make([]byte, 16)
	copy(key, pass)
	return luks.NewSectorCipher(luks.Spec{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "plain64", HashAlg: "sha256"}, key)
}

// CheckEncryptAlias refuses the legacy "encryption=on" together with
// encrypt.format, as the qcow and qcow2 drivers do when they rename the
// one to the other, before they create any file.
func CheckEncryptAlias(o *formats.Options) error {
	if o.Bool("encryption") && o.Has("encrypt.format") {
		return formats.Errorf(formats.ErrInvalidOption, "'encrypt.format' and its alias 'encryption' can't be used at the same time")
	}
	return nil
}

// EncryptFormat is the encryption the creation options ask for, as
// QEMU's QAPI parsing of the qcow and qcow2 options finds it: "" for
// none, "aes" (QEMU's "qcow", also from encryption=on) or "luks". Any
// other encrypt.* option needs encrypt.format.
func EncryptFormat(o *formats.Options) (string, error) {
	if !o.Has("encrypt.format") {
		if o.Bool("encryption") {
			return "aes", nil
		}
		for _, s := range o.Specs {
			if strings.HasPrefix(s.Name, "encrypt.") && o.Has(s.Name) {
				return "", formats.Errorf(formats.ErrInvalidOption, "Parameter 'encrypt.format' is missing")
			}
		}
		return "", nil
	}
	switch v := o.String("encrypt.format"); v {
	case "aes", "qcow":
		return "aes", nil
	case "luks":
		return "luks", nil
	default:
		// QEMU names the member without its "encrypt." prefix here.
		return "", formats.Errorf(formats.ErrInvalidOption, "Parameter 'format' does not accept value '%s'", v)
	}
}

// checkEncryptFormat is qcow_open's check of the encrypt.format open
// option against the header: it may only name the image's encryption.
func checkEncryptFormat(h *Header, o *formats.OpenOptions) error {
	want, ok := o.Runtime["encrypt.format"]
	switch {
	case !ok:
	case h.CryptMethod == cryptNone:
		return formats.Errorf(formats.ErrInvalidOption, "No encryption in image header, but options specified format '%s'", want)
	case want != "aes":
		return formats.Errorf(formats.ErrInvalidOption, "Header reported 'aes' encryption format but options specify '%s'", want)
	}
	return nil
}
