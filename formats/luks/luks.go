// Package luks is the LUKS (version 1) encrypted image format, as QEMU's
// luks driver (block/crypto.c over crypto/block-luks.c) reads and writes
// it: a LUKS1 header with eight key slots, then the payload, 512-byte
// sectors each encrypted with an IV from its sector number. The format
// is the LUKS1 on-disk format specification
// (https://gitlab.com/cryptsetup/cryptsetup/-/wikis/LUKS-standard/on-disk-format.pdf).
//
// The header, key slot and sector cipher API (ParseHeader, Unlock, Format,
// SectorCipher) works on any io.ReaderAt/WriterAt region, so that qcow2
// can keep a LUKS header inside its file.
package luks

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/imgfs/imgfs/formats"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "luks",
		Probe:         func(buf []byte, _ string) int { return Probe(buf) },
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
		AmendOptions:  amendOptions,
		Measure:       measure,
	})
}

// Image is an open LUKS image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	hdr      *Header
	readOnly bool
	// size changes only under mu (Resize); reads load it without.
	size    atomic.Int64
	payload int64 // host offset of guest byte 0
	// c is nil when the image was opened without I/O (info), which
	// needs no key.
	c *SectorCipher

	// mu serialises writes: a write of part of a sector reads, changes
	// and rewrites the whole sector, which must not interleave with
	// another write to it. Amend holds it while it changes hdr, Resize
	// while it changes the file and size, so that no write checked
	// against the old size lands past a shrunken end.
	mu sync.Mutex
}

var (
	_ formats.Image            = (*Image)(nil)
	_ formats.Describer        = (*Image)(nil)
	_ formats.Zeroer           = (*Image)(nil)
	_ formats.AllocatedSizer   = (*Image)(nil)
	_ formats.ZeroInitReporter = (*Image)(nil)
	_ formats.Amender          = (*Image)(nil)
	_ formats.Resizer          = (*Image)(nil)
)

func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := openImage(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func openImage(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	hdr, err := ReadHeader(f, 0)
	if err != nil {
		return nil, err
	}
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	img := &Image{f: f, hdr: hdr, readOnly: o.ReadOnly, payload: hdr.PayloadOffset()}
	img.size.Store(payloadSize(fileSize, img.payload))
	if o.NoIO {
		return img, nil
	}
	if o.KeySecret == "" {
		return nil, formats.Errorf(formats.ErrInvalidOption, "Parameter 'key-secret' is required for cipher")
	}
	password, err := lookupSecretData(o.KeySecret, o.Secrets)
	if err != nil {
		return nil, err
	}
	if img.c, err = hdr.Unlock(f, 0, password); err != nil {
		return nil, err
	}
	return img, nil
}

// lookupSecretData returns the data of the --object secret id, with
// QEMU's message when there is none.
func lookupSecretData(id string, secrets map[string][]byte) ([]byte, error) {
	data, ok := secrets[id]
	if !ok {
		return nil, formats.Errorf(formats.ErrInvalidOption, "No secret with id '%s'", id)
	}
	return data, nil
}

// payloadSize is the virtual size of a LUKS file of fileSize bytes: QEMU's
// crypto driver reports the file beyond the payload offset, and the file
// protocol counts a file's length in whole sectors, so a partial last
// sector (left by a resize to an unaligned size) counts as a whole one.
func payloadSize(fileSize, payload int64) int64 {
	return (max(fileSize-payload, 0) + SectorSize - 1) &^ (SectorSize - 1)
}

func (img *Image) Size() int64      { return img.size.Load() }
func (img *Image) Format() string   { return "luks" }
func (img *Image) Filename() string { return img.f.Name() }

// AllocatedSize is the host file's allocation.
func (img *Image) AllocatedSize() (int64, error) { return img.f.AllocatedSize() }
func (img *Image) Flush() error                  { return img.f.Sync() }
func (img *Image) Close() error                  { return img.f.Close() }

// errNoKey refuses guest I/O on an image opened for metadata only.
var errNoKey = fmt.Errorf("LUKS image opened without its key: %w", formats.ErrUnsupported)

// span returns the sector-aligned range covering n bytes at off.
func span(off int64, n int) (start, end int64) {
	return off &^ (SectorSize - 1), (off + int64(n) + SectorSize - 1) &^ (SectorSize - 1)
}

func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, formats.ErrInvalidOption)
	}
	size := img.size.Load()
	if off >= size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	var eof error
	if rest := size - off; int64(len(p)) > rest {
		p, eof = p[:rest], io.EOF
	}
	if err := img.read(p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

// read decrypts the sectors covering p and copies p's part of them.
func (img *Image) read(p []byte, off int64) error {
	if img.c == nil {
		return errNoKey
	}
	start, end := span(off, len(p))
	buf, bounce := p, start != off || end != off+int64(len(p))
	if bounce {
		buf = make([]byte, end-start)
	}
	if _, err := img.f.ReadAt(buf, img.payload+start); err != nil {
		return err
	}
	img.c.Decrypt(buf, uint64(start/SectorSize))
	if bounce {
		copy(p, buf[off-start:])
	}
	return nil
}

func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.readOnly {
		return 0, formats.ErrReadOnly
	}
	if img.c == nil {
		return 0, errNoKey
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if size := img.size.Load(); off < 0 || off+int64(len(p)) > size {
		return 0, fmt.Errorf("write of %d bytes at %d past the image size %d: %w", len(p), off, size, formats.ErrInvalidOption)
	}
	if len(p) == 0 {
		return 0, nil
	}
	start, end := span(off, len(p))
	buf := make([]byte, end-start)
	if start != off {
		if err := img.read(buf[:SectorSize], start); err != nil {
			return 0, err
		}
	}
	if last := end - SectorSize; end != off+int64(len(p)) && (last != start || start == off) {
		if err := img.read(buf[last-start:], last); err != nil {
			return 0, err
		}
	}
	copy(buf[off-start:], p)
	img.c.Encrypt(buf, uint64(start/SectorSize))
	if _, err := img.f.WriteAt(buf, img.payload+start); err != nil {
		return 0, err
	}
	return len(p), nil
}

// zeroChunk bounds the buffer WriteZeroes encrypts at a time.
const zeroChunk = 1 << 20

// WriteZeroes writes encrypted zeroes: LUKS cannot leave a range
// unallocated, as a hole decrypts to noise.
func (img *Image) WriteZeroes(off, length int64, _ bool) error {
	if length <= 0 {
		return nil
	}
	zero := make([]byte, min(length, zeroChunk))
	for length > 0 {
		n := min(length, zeroChunk)
		if _, err := img.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// HasZeroInit is false: unwritten sectors decrypt to noise.
func (img *Image) HasZeroInit() bool { return false }

// BlockStatus reports everything as data: like QEMU's crypto driver,
// LUKS has no allocation map of its own.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	size := img.size.Load()
	if off < 0 || off >= size {
		return formats.Extent{}, io.EOF
	}
	return formats.Extent{Length: min(length, size-off), Status: formats.StatusData}, nil
}

// Amend adds or erases key slots (block_crypto_amend_options_luks).
func (img *Image) Amend(o *formats.Options, force bool, _ func(done, total int64)) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	p, err := ParseAmendOptions(o, "")
	if err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.hdr.Amend(img.f, 0, img.c, p, o.Secrets, force); err != nil {
		return err
	}
	return img.f.Sync()
}

// Describe reports the header as qemu-img info shows it.
func (img *Image) Describe() (*formats.Description, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	return &formats.Description{
		Encrypted:      true,
		HasDirtyFlag:   true,
		FormatSpecific: &formats.Specific{Type: "luks", Data: img.hdr.Info()},
	}, nil
}
