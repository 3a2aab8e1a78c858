package luks

import (
	"fmt"
	"os"
	"slices"

	"github.com/imgfs/imgfs/formats"
)

// createOptions is QEMU's luks creation table (block_crypto_create_opts_luks):
// the size, then the LUKS options; the file protocol's follow.
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "key-secret", Type: formats.OptString, Help: "ID of the secret that provides the keyslot passphrase"},
	{Name: "cipher-alg", Type: formats.OptString, Help: "Name of encryption cipher algorithm"},
	{Name: "cipher-mode", Type: formats.OptString, Help: "Name of encryption cipher mode"},
	{Name: "ivgen-alg", Type: formats.OptString, Help: "Name of IV generator algorithm"},
	{Name: "ivgen-hash-alg", Type: formats.OptString, Help: "Name of IV generator hash algorithm"},
	{Name: "hash-alg", Type: formats.OptString, Help: "Name of encryption hash algorithm"},
	{Name: "iter-time", Type: formats.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
}

// CreateParams are the LUKS creation options: the encryption scheme, the
// passphrase and the PBKDF2 time.
type CreateParams struct {
	Spec     Spec
	Password []byte
	IterTime uint64 // milliseconds
}

// qapiEnums are the values QAPI accepts for the enum options, whether or
// not imgfs implements them: a value outside them is a parse error, one
// inside that imgfs lacks is refused as unsupported.
var qapiEnums = map[string][]string{
	"cipher-alg": {"aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128",
		"serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256"},
	"cipher-mode":    {"ecb", "cbc", "xts", "ctr"},
	"ivgen-alg":      {"plain", "plain64", "essiv"},
	"ivgen-hash-alg": hashNames,
	"hash-alg":       hashNames,
}

var hashNames = []string{"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"}

// ParseCreateOptions reads the LUKS creation options from opts with
// QEMU's defaults (aes-256, xts, plain64, sha256, 2000 ms); prefix is ""
// for the luks format and "encrypt." for qcow2's. The passphrase comes
// from the secret key-secret names. Errors come in QEMU's order: option
// values (named without the prefix, as QEMU's visitor of the extracted
// options names them), then the secret (named with it), then what
// cannot be done.
func ParseCreateOptions(opts *formats.Options, prefix string) (*CreateParams, error) {
	for _, name := range []string{"cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg"} {
		if v := opts.String(prefix + name); opts.Has(prefix+name) && !slices.Contains(qapiEnums[name], v) {
			return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter '%s' does not accept value '%s'", name, v)
		}
	}
	get := func(name, def string) string {
		if opts.Has(prefix + name) {
			return opts.String(prefix + name)
		}
		return def
	}
	p := &CreateParams{Spec: Spec{
		CipherAlg:    get("cipher-alg", "aes-256"),
		CipherMode:   get("cipher-mode", "xts"),
		IVGenAlg:     get("ivgen-alg", "plain64"),
		IVGenHashAlg: get("ivgen-hash-alg", ""),
		HashAlg:      get("hash-alg", "sha256"),
	}, IterTime: DefaultIterTime}
	if p.Spec.IVGenAlg == "essiv" && p.Spec.IVGenHashAlg == "" {
		// QEMU's default ESSIV hash.
		p.Spec.IVGenHashAlg = "sha256"
	}
	if n, ok := opts.Uint(prefix + "iter-time"); ok {
		p.IterTime = n
	}
	id := get("key-secret", "")
	if id == "" {
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter '%skey-secret' is required for cipher", prefix)
	}
	var err error
	if p.Password, err = lookupSecretData(id, opts.Secrets); err != nil {
		return nil, err
	}
	return p, p.Spec.validateCreate()
}

// create makes a LUKS image: the header and key material, then the
// payload of the requested size rounded up to a sector, as QEMU's
// block_crypto_co_create_opts_luks does.
func create(filename string, opts *formats.Options) error {
	params, err := ParseCreateOptions(opts, "")
	if err != nil {
		return err
	}
	size, _ := opts.Uint("size")
	f, err := formats.CreateProtocolFile(filename, opts)
	if err != nil {
		return err
	}
	// Like QEMU, remove the file again when formatting fails.
	fail := func(err error) error {
		f.Close()
		os.Remove(filename)
		return err
	}
	hdr, _, err := Format(f, 0, params.Spec, params.Password, params.IterTime)
	if err != nil {
		return fail(err)
	}
	size = (size + SectorSize - 1) &^ (SectorSize - 1)
	total := hdr.PayloadOffset() + int64(size)
	if err := f.Truncate(total); err != nil {
		return fail(fmt.Errorf("Could not resize file: %w", formats.ErrnoError{Err: err}))
	}
	// QEMU preallocates the header region and the payload alike; "full"
	// writes zeroes, which an allocated range reads as, so both modes
	// allocate.
	if m := opts.String("preallocation"); m == "falloc" || m == "full" {
		if err := f.Allocate(0, total); err != nil {
			return fail(fmt.Errorf("Could not preallocate new data: %w", formats.ErrnoError{Err: err}))
		}
	}
	return f.Close()
}

// measure is block_crypto_measure: the header region the options ask
// for plus the virtual size (a source's rounded up to a sector, --size
// as given), allocated or not. Like QEMU it
// needs the key-secret (QEMU formats a scratch header to learn the
// region size; imgfs computes it).
func measure(opts *formats.Options, src formats.Image) (*formats.MeasureResult, error) {
	params, err := ParseCreateOptions(opts, "")
	if err != nil {
		return nil, err
	}
	region, err := RegionSize(params.Spec)
	if err != nil {
		return nil, err
	}
	n, _ := opts.Uint("size")
	size := int64(n)
	if src != nil {
		size = (src.Size() + SectorSize - 1) &^ (SectorSize - 1)
	}
	return &formats.MeasureResult{Required: region + size, FullyAllocated: region + size}, nil
}
