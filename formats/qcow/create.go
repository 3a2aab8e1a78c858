package qcow

import (
	"github.com/imgfs/imgfs/formats"
)

// createOptions are qcow's -o options in QEMU 7.2's table order.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "backing_file", Type: formats.OptString, Help: "File name of a base image"},
	{Name: "backing_fmt", Type: formats.OptString, Help: "Format of the backing image"},
	{Name: "encryption", Type: formats.OptBool, Help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
	{Name: "encrypt.format", Type: formats.OptString, Help: "Encrypt the image, format choices: 'aes'"},
	{Name: "encrypt.key-secret", Type: formats.OptString, Help: "ID of the secret that provides the AES encryption key"},
}

// create is qcow_co_create_opts and qcow_co_create: a header, the
// backing file name right after it, and a zeroed L1 table written in
// whole sectors. Images with a backing file get 512-byte clusters (so a
// partial write never needs the backing data) and 32 KiB L2 tables,
// others 4 KiB of both. The backing format is checked but not stored.
// The checks come in QEMU's order: those before the file is created
// leave none behind, the later ones an empty file.
func create(filename string, o *formats.Options) error {
	if bf := o.String("backing_fmt"); bf != "" && formats.Lookup(bf) == nil {
		return formats.Errorf(formats.ErrInvalidOption, "unrecognized backing format '%s'", bf)
	}
	if err := CheckEncryptAlias(o); err != nil {
		return err
	}
	f, err := formats.CreateProtocolFile(filename, o)
	if err != nil {
		return err
	}
	err = createOn(f, o)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func createOn(f *formats.File, o *formats.Options) error {
	format, err := EncryptFormat(o)
	if err != nil {
		return err
	}
	n, _ := o.Uint("size")
	if n == 0 {
		return formats.Errorf(formats.ErrInvalidOption, "Image size is too small, cannot be zero length")
	}
	switch format {
	case "":
	case "aes":
		// The legacy scheme stores nothing but the method: the secret
		// only has to be usable.
		if _, err := NewLegacyCipher(o.String("encrypt.key-secret"), o.Secrets); err != nil {
			return err
		}
	default:
		return formats.Errorf(formats.ErrInvalidOption, "Unsupported encryption format")
	}
	if n > 1<<63-512 {
		return formats.Errorf(formats.ErrInvalidOption, "Image size is too large")
	}
	h := &Header{Magic: magic, Version: version, Size: (n + 511) &^ 511, ClusterBits: 12, L2Bits: 9}
	if format == "aes" {
		h.CryptMethod = cryptAES
	}
	hsize := uint64(headerSize)
	backing := o.String("backing_file")
	if backing == "fat:" {
		// QEMU's special name for a vvfat backing image stores none.
		backing = ""
		h.ClusterBits, h.L2Bits = 9, 12
	}
	if backing != "" {
		if len(backing) > maxBackingName {
			return formats.Errorf(formats.ErrInvalidOption, "Backing file name too long")
		}
		h.BackingFileOffset = hsize
		h.BackingFileSize = uint32(len(backing))
		hsize += uint64(len(backing))
		h.ClusterBits, h.L2Bits = 9, 12
	}
	h.L1TableOffset = (hsize + 7) &^ 7
	l1 := h.l1Entries()
	if l1 > maxL1Entries {
		return formats.Errorf(formats.ErrInvalidOption, "Image too large")
	}
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return formats.ErrnoError{Err: err}
	}
	if backing != "" {
		if _, err := f.WriteAt([]byte(backing), headerSize); err != nil {
			return formats.ErrnoError{Err: err}
		}
	}
	// The L1 table is written as zeroes in whole sectors, so that the
	// file's allocation (info's disk size) is QEMU's too.
	end := int64(h.L1TableOffset + (8*l1+511)&^511)
	zero := make([]byte, min(end-int64(h.L1TableOffset), 1<<20))
	for off := int64(h.L1TableOffset); off < end; off += int64(len(zero)) {
		if _, err := f.WriteAt(zero[:min(int64(len(zero)), end-off)], off); err != nil {
			return formats.ErrnoError{Err: err}
		}
	}
	return nil
}
