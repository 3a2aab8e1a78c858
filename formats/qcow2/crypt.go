package qcow2

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
)

// Header crypt_method values.
const (
	cryptNone = 0
	cryptAES  = 1 // legacy qcow AES-CBC, read-only here
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
// (LUKS, crypt_method 2) or is the key (legacy AES, crypt_method 1,
// which imgfs only reads).
func openCrypto(f *formats.File, h *Header, o *formats.OpenOptions, readOnly bool) (*cryptoState, error) {
	switch h.CryptMethod {
	case cryptLUKS:
	case cryptAES:
		if !readOnly {
			return nil, errorf(formats.ErrUnsupported, "qcow2: writing legacy AES encrypted images is not supported")
		}
		if o.NoIO {
			return &cryptoState{}, nil
		}
		password, err := cryptSecret(o)
		if err != nil {
			return nil, err
		}
		c, err := legacyAESCipher(password)
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

// legacyAESCipher is QEMU's qcow AES scheme (crypto/block-qcow.c):
// AES-128-CBC with plain64 IVs, the key the passphrase's first 16 bytes
// zero-padded, without any key derivation.
func legacyAESCipher(password []byte) (*luks.SectorCipher, error) {
	key := make([]byte, 16)
	copy(key, password)
	return luks.NewSectorCipher(luks.Spec{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "plain64", HashAlg: "sha256"}, key)
}

// readEncrypted reads len(p) guest bytes at guest offset guest stored at
// host offset host and decrypts them. LUKS in qcow2 uses the host offset
// as the IV sector (QEMU sets crypt_physical_offset for LUKS), legacy
// AES the guest offset; whole sectors around the range are read and
// decrypted.
func (img *Image) readEncrypted(p []byte, host, guest uint64) error {
	if img.crypt.c == nil {
		return errorf(formats.ErrInvalidOption, "qcow2: image is encrypted and no key was given")
	}
	ivBase := host
	if img.crypt.hdr == nil {
		ivBase = guest
	}
	ivBase &^= luks.SectorSize - 1
	start := host &^ (luks.SectorSize - 1)
	end := (host + uint64(len(p)) + luks.SectorSize - 1) &^ (luks.SectorSize - 1)
	buf := make([]byte, end-start)
	if _, err := img.data.ReadAt(buf, int64(start)); err != nil {
		return fmt.Errorf("%s: reading %d bytes at host offset %#x: %w", img.data.Name(), len(buf), start, err)
	}
	img.crypt.c.Decrypt(buf, ivBase/luks.SectorSize)
	copy(p, buf[host-start:])
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

// writeEncrypted encrypts and writes p at host offset host in a cluster
// the image owns (LUKS only: legacy AES images open read-only). Partial sectors at either end are read and decrypted
// first, so whole sectors are encrypted with their host sector as IV.
func (img *Image) writeEncrypted(p []byte, host uint64) error {
	start := host &^ (luks.SectorSize - 1)
	end := (host + uint64(len(p)) + luks.SectorSize - 1) &^ (luks.SectorSize - 1)
	buf := make([]byte, end-start)
	if head := host - start; head != 0 {
		if err := img.readEncrypted(buf[:head], start, start); err != nil {
			return err
		}
	}
	if tail := host + uint64(len(p)); tail != end {
		if err := img.readEncrypted(buf[tail-start:], tail, tail); err != nil {
			return err
		}
	}
	copy(buf[host-start:], p)
	img.crypt.c.Encrypt(buf, start/luks.SectorSize)
	if _, err := img.data.WriteAt(buf, int64(start)); err != nil {
		return fmt.Errorf("%s: writing %d bytes at host offset %#x: %w", img.data.Name(), len(buf), start, err)
	}
	return nil
}

// parseCryptOptions reads the encrypt.* creation options: nil when the
// image is not to be encrypted, LUKS parameters for encrypt.format=luks.
func parseCryptOptions(o *formats.Options) (*luks.CreateParams, error) {
	format := o.String("encrypt.format")
	if !o.Has("encrypt.format") {
		if o.Bool("encryption") {
			format = "aes"
		} else {
			for _, s := range o.Specs {
				if strings.HasPrefix(s.Name, "encrypt.") && o.Has(s.Name) {
					return nil, errorf(formats.ErrInvalidOption, "Parameter 'encrypt.format' is missing")
				}
			}
			return nil, nil
		}
	}
	switch format {
	case "luks":
	case "aes":
		return nil, errorf(formats.ErrUnsupported, "qcow2: creating legacy AES encrypted images is not supported")
	default:
		return nil, errorf(formats.ErrInvalidOption, "Parameter 'encrypt.format' does not accept value '%s'", format)
	}
	if !o.Has("encrypt.key-secret") {
		// The LUKS parser names the option without qcow2's prefix.
		return nil, errorf(formats.ErrInvalidOption, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	return luks.ParseCreateOptions(o, "encrypt.")
}

// setUpEncryption formats a new image with LUKS as qcow2_set_up_encryption
// does: a zeroed header region of whole clusters allocated after
// everything else, the LUKS header and key material in it, the header
// extension pointing at it and crypt_method 2.
func (img *Image) setUpEncryption(cp *luks.CreateParams) error {
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
