package qcow2

import (
	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
)

// cryptAmend is what amend's encrypt.* options ask of an image with a
// LUKS header: the options, read when the step runs as QEMU reads them
// (after an upgrade), and --force.
type cryptAmend struct {
	opts  *formats.Options
	force bool
}

// checkCryptAmend is qcow2_amend_options' check of an encrypt.* option:
// the image must be encrypted, with LUKS.
func (img *Image) checkCryptAmend() error {
	if img.crypt == nil {
		return errorf(formats.ErrInvalidOption, "Can't amend encryption options - encryption not present")
	}
	if img.crypt.hdr == nil {
		return errorf(formats.ErrUnsupported, "Only LUKS encryption options can be amended")
	}
	return nil
}

// amendEncryption adds or erases LUKS key slots in the header region,
// as qcrypto_block_amend_options through qcow2's header read and write
// functions. img.mu is held.
func (img *Image) amendEncryption(ca *cryptAmend) error {
	p, err := luks.ParseAmendOptions(ca.opts, "encrypt.")
	if err != nil {
		return err
	}
	off, length, err := cryptoRegion(img.hdr)
	if err != nil {
		return err
	}
	region := &cryptRegion{f: img.file, off: int64(off), length: int64(length)}
	if err := img.crypt.hdr.Amend(region, region.off, img.crypt.c, p, ca.opts.Secrets, ca.force); err != nil {
		return err
	}
	return img.file.Sync()
}

// cryptRegion confines LUKS header reads and writes to the header
// region, as qcow2_crypto_hdr_read_func and _write_func do.
type cryptRegion struct {
	f           luks.ReadWriterAt
	off, length int64
}

func (r *cryptRegion) check(n int, at int64) error {
	if at < r.off || at-r.off+int64(n) > r.length {
		return errorf(formats.ErrCorrupt, "Request for data outside of extension header")
	}
	return nil
}

func (r *cryptRegion) ReadAt(p []byte, at int64) (int, error) {
	if err := r.check(len(p), at); err != nil {
		return 0, err
	}
	return r.f.ReadAt(p, at)
}

func (r *cryptRegion) WriteAt(p []byte, at int64) (int, error) {
	if err := r.check(len(p), at); err != nil {
		return 0, err
	}
	return r.f.WriteAt(p, at)
}
