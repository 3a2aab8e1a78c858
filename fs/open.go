package fs

import (
	"errors"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// open is formats.Open for the mount's images: a format the caller
// leaves open is chosen by mountFormat, and encrypted images get the
// mount's passphrase (-o key_file).
func (s *source) open(path string, o formats.OpenOptions) (formats.Image, error) {
	if o.Format == "" {
		o.Format = mountFormat(path)
	}
	o.Secrets, o.KeySecret = s.secrets, s.keySecret
	img, err := formats.Open(path, o)
	if err != nil && !o.NoIO && keyFailure(err) && encrypted(path, o.Format) {
		// The header reads, the data does not unlock: the passphrase
		// is missing or wrong, a matter of permission.
		return nil, formats.Errorf(errNoKey, "%v (the passphrase is given by mounting with -o key_file=PATH)", err)
	}
	return img, err
}

// errNoKey tags the refusal to open an encrypted image that the mount's
// passphrase does not unlock; it becomes EACCES.
var errNoKey = errors.New("no key for the encrypted image")

// keyFailure reports whether err is how drivers refuse a missing
// passphrase (their key-secret option is not set: EINVAL) or a wrong one
// (no key slot unlocks: EIO, the image not being damaged); a lock
// conflict or a damaged image keeps its own errno.
func keyFailure(err error) bool {
	switch Errno(err) {
	case syscall.EINVAL:
		return true
	case syscall.EIO:
		return !errors.Is(err, formats.ErrCorrupt)
	}
	return false
}

// encrypted reports whether the image at path, opened for its header
// only, says its data is encrypted.
func encrypted(path, format string) bool {
	o := peekOptions
	o.Format = format
	img, err := formats.Open(path, o)
	if err != nil {
		return false
	}
	defer img.Close()
	d, ok := img.(formats.Describer)
	if !ok {
		return false
	}
	desc, err := d.Describe()
	return err == nil && desc.Encrypted
}
