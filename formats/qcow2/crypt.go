package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
	"github.com/imgfs/imgfs/formats/qcow"
)

// Header crypt_method values.
const (
	cryptNone = 0
	cryptAES  = 1 // legacy qcow AES-CBC
	cryptLUKS = 2
)

// cryptoState is an open encrypted image's encryption: the LUKS header
// (for info; nil with legacy AES) and, when a passphrase was given, the
// data cipher.
type cryptoState struct {
	hdr *luks.Header
	// c is nil for metadata-only opens (qemu-img info needs no key).
	c *luks.SectorCipher
}

// ivSector is the IV sector of the data at host offset host and guest
// offset guest: LUKS in qcow2 counts host sectors (QEMU sets
// crypt_physical_offset for it), legacy AES guest sectors.
func (cs *cryptoState) ivSector(host, guest uint64) uint64 {
	if cs.hdr == nil {
		return guest / luks.SectorSize
	}
	return host / luks.SectorSize
}

// cryptoRegion returns the LUKS header region's host offset and length
// from the full disk encryption header extension.
func cryptoRegion(h *Header) (off, length uint64, err error) {
	if len(h.CryptoExt) < 16 {
		return 0, 0, errorf(formats.ErrCorrupt, "qcow2: encryption header extension missing or too short (%d bytes)", len(h.CryptoExt))
	}
	off = binary.BigEndian.Uint64(h.CryptoExt)
	length = binary.BigEndian.Uint64(h.CryptoExt[8:])
	if off == 0 || off&(h.ClusterSize()-1) != 0 || off >= maxHostOffset || length > maxHostOffset-off {
		return 0, 0, errorf(formats.ErrCorrupt, "qcow2: invalid encryption header region at %#x, length %d", off, length)
	}
	return off, length, nil
}

// openCrypto sets up decryption as qcow2_update_options_part2 does;
// without NoIO the passphrase from o.KeySecret unlocks the volume key
// (LUKS, crypt_method 2) or is the key (legacy AES, crypt_method 1).
// qemu-img reads and writes legacy AES images without a warning (only
// system emulators refuse them).
func openCrypto(f *formats.File, h *Header, o *formats.OpenOptions) (*cryptoState, error) {
	switch h.CryptMethod {
	case cryptLUKS:
	case cryptAES:
		if o.NoIO {
			return &cryptoState{}, nil
		}
		c, err := qcow.NewLegacyCipher(o.KeySecret, o.Secrets)
		if err != nil {
			return nil, err
		}
		return &cryptoState{c: c}, nil
	default:
		return nil, errorf(formats.ErrUnsupported, "qcow2: unknown encryption method %d", h.CryptMethod)
	}
	off, length, err := cryptoRegion(h)
	if err != nil {
		return nil, err
	}
	lh, err := luks.ReadHeader(f, int64(off))
	if err != nil {
		return nil, fmt.Errorf("qcow2: LUKS header at %#x: %w", off, err)
	}
	if uint64(lh.PayloadOffset()) > length {
		return nil, errorf(formats.ErrCorrupt, "qcow2: LUKS key material (%d bytes) exceeds the header region (%d bytes)", lh.PayloadOffset(), length)
	}
	cs := &cryptoState{hdr: lh}
	if o.NoIO {
		return cs, nil
	}
	password, err := cryptSecret(o)
	if err != nil {
		return nil, err
	}
	if cs.c, err = lh.Unlock(f, int64(off), password); err != nil {
		return nil, err
	}
	return cs, nil
}

// cryptSecret returns the passphrase o.KeySecret names, with QEMU's
// messages.
func cryptSecret(o *formats.OpenOptions) ([]byte, error) {
	if o.KeySecret == "" {
		return nil, errorf(formats.ErrInvalidOption, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	password, ok := o.Secrets[o.KeySecret]
	if !ok {
		return nil, errorf(formats.ErrInvalidOption, "No secret with id '%s'", o.KeySecret)
	}
	return password, nil
}

// readEncrypted reads len(p) guest bytes at guest offset guest stored at
// host offset host and decrypts them; whole sectors around the range
// are read and decrypted. Host and guest offsets share their offset in
// the cluster, so the sectors line up in both.
func (img *Image) readEncrypted(p []byte, host, guest uint64) error {
	if img.crypt.c == nil {
		return errorf(formats.ErrInvalidOption, "qcow2: image is encrypted and no key was given")
	}
	head := host & (luks.SectorSize - 1)
	start := host - head
	end := (host + uint64(len(p)) + luks.SectorSize - 1) &^ (luks.SectorSize - 1)
	buf := make([]byte, end-start)
	if _, err := img.data.ReadAt(buf, int64(start)); err != nil {
		return fmt.Errorf("%s: reading %d bytes at host offset %#x: %w", img.data.Name(), len(buf), start, err)
	}
	img.crypt.c.Decrypt(buf, img.crypt.ivSector(start, guest-head))
	copy(p, buf[head:])
	return nil
}

// describe is the "encrypt" member of qcow2's format-specific info
// (ImageInfoSpecificQCow2Encryption: the format, then the LUKS info).
func (cs *cryptoState) describe() formats.Member {
	if cs.hdr == nil {
		return formats.Member{Key: "encrypt", Value: formats.Object{{Key: "format", Value: "aes"}}}
	}
	return formats.Member{Key: "encrypt", Value: append(formats.Object{{Key: "format", Value: "luks"}}, cs.hdr.Info()...)}
}

// writeEncrypted encrypts and writes p, guest bytes at guest offset
// guest, at host offset host in a cluster the image owns. Partial
// sectors at either end are read and decrypted first, so that whole
// sectors are encrypted.
func (img *Image) writeEncrypted(p []byte, host, guest uint64) error {
	head := host & (luks.SectorSize - 1)
	start := host - head
	end := (host + uint64(len(p)) + luks.SectorSize - 1) &^ (luks.SectorSize - 1)
	buf := make([]byte, end-start)
	if head != 0 {
		if err := img.readEncrypted(buf[:head], start, guest-head); err != nil {
			return err
		}
	}
	if tail := host + uint64(len(p)); tail != end {
		if err := img.readEncrypted(buf[tail-start:], tail, guest+uint64(len(p))); err != nil {
			return err
		}
	}
	copy(buf[head:], p)
	img.crypt.c.Encrypt(buf, img.crypt.ivSector(start, guest-head))
	if _, err := img.data.WriteAt(buf, int64(start)); err != nil {
		return fmt.Errorf("%s: writing %d bytes at host offset %#x: %w", img.data.Name(), len(buf), start, err)
	}
	return nil
}

// aesUnexpected are the encrypt.* options only LUKS takes, in the order
// QEMU reports the first one given with encrypt.format=aes: QAPI lists
// the members it did not use from a glib hash table, whose order this
// is, except when all of them and the key secret fill the table and it
// grows, which moves hash-alg first.
var aesUnexpected = []string{"cipher-alg", "iter-time", "cipher-mode", "ivgen-alg", "hash-alg", "ivgen-hash-alg"}

// checkCryptFormat is the QAPI parsing of the encrypt.* options, which
// comes between the compat and preallocation options: it returns the
// requested encryption ("", "aes" or "luks") and refuses LUKS's options
// with legacy AES.
func checkCryptFormat(o *formats.Options) (string, error) {
	format, err := qcow.EncryptFormat(o)
	if format != "aes" || err != nil {
		return format, err
	}
	var given []string
	for _, name := range aesUnexpected {
		if o.Has("encrypt." + name) {
			given = append(given, name)
		}
	}
	switch {
	case len(given) == 0:
		return format, nil
	case len(given) == len(aesUnexpected) && o.Has("encrypt.key-secret"):
		given[0] = "hash-alg"
	}
	return "", errorf(formats.ErrInvalidOption, "Parameter 'encrypt.%s' is unexpected", given[0])
}

// cryptParams are the validated encryption of a new image.
type cryptParams struct {
	// luks holds the LUKS parameters; nil for legacy AES, which needs
	// no more than a usable secret.
	luks *luks.CreateParams
}

// parseCryptOptions checks what qcow2_set_up_encryption will need for
// the encryption checkCryptFormat returned: nil when the image is not to
// be encrypted.
func parseCryptOptions(o *formats.Options, format string) (*cryptParams, error) {
	switch format {
	case "":
		return nil, nil
	case "aes":
		if _, err := qcow.NewLegacyCipher(o.String("encrypt.key-secret"), o.Secrets); err != nil {
			return nil, err
		}
		return &cryptParams{}, nil
	}
	if !o.Has("encrypt.key-secret") {
		// The LUKS parser names the option without qcow2's prefix.
		return nil, errorf(formats.ErrInvalidOption, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	cp, err := luks.ParseCreateOptions(o, "encrypt.")
	if err != nil {
		return nil, err
	}
	return &cryptParams{luks: cp}, nil
}

// setUpEncryption is qcow2_set_up_encryption: legacy AES only sets
// crypt_method 1 in the header, LUKS formats its header region.
func (img *Image) setUpEncryption(cp *cryptParams) error {
	if cp.luks == nil {
		img.mu.Lock()
		defer img.mu.Unlock()
		img.hdr.CryptMethod = cryptAES
		return img.writeHeader()
	}
	return img.setUpLUKS(cp.luks)
}

// setUpLUKS formats a new image with LUKS as qcow2_set_up_encryption
// does: a zeroed header region of whole clusters allocated after
// everything else, the LUKS header and key material in it, the header
// extension pointing at it and crypt_method 2.
func (img *Image) setUpLUKS(cp *luks.CreateParams) error {
	region, err := luks.RegionSize(cp.Spec)
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	cs := img.lay.ClusterSize
	n := (region + cs - 1) / cs
	host, err := img.allocClusters(n)
	if err != nil {
		return fmt.Errorf("Could not allocate LUKS header region: %w", err)
	}
	// QEMU writes zeroes over the whole region, so it is allocated.
	if _, err := img.file.WriteAt(make([]byte, n*cs), int64(host)); err != nil {
		return fmt.Errorf("Could not zero LUKS header region: %w", err)
	}
	if _, _, err := luks.Format(img.file, int64(host), cp.Spec, cp.Password, cp.IterTime); err != nil {
		return err
	}
	ext := make([]byte, 16)
	binary.BigEndian.PutUint64(ext, host)
	binary.BigEndian.PutUint64(ext[8:], uint64(region))
	img.hdr.CryptMethod = cryptLUKS
	img.hdr.CryptoExt = ext
	return img.writeHeader()
}
