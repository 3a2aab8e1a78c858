package parallels

import (
	"bytes"
	"crypto/md5"
	"encoding/binary"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

const (
	extMagic         = 0xAB234CEF23DCEA87
	extHeaderSize    = 24 // magic and MD5 checksum
	featureSize      = 24 // magic, flags, data size, unused
	featureEnd       = 0
	featureBitmap    = 0x20385FAE252CB34A
	extChecksumStart = 8
)

// checkExtension validates the format extension cluster at sector
// extOff, as parallels_read_format_extension does when QEMU opens an
// image read-only: the magic, the MD5 checksum of the rest of the
// cluster, and a well-formed feature list. Dirty bitmap features are
// accepted without loading them: imgfs has no use for a parallels
// image's bitmaps.
func (img *Image) checkExtension(extOff uint64, fileSize int64) error {
	if extOff > uint64(fileSize)/sectorSize {
		return fmt.Errorf("%s: Format Extension at sector %d past the end of the file (%d bytes): %w",
			img.f.Name(), extOff, fileSize, formats.ErrCorrupt)
	}
	off := int64(extOff) * sectorSize
	var head [extHeaderSize]byte
	if _, err := img.f.ReadAt(head[:], off); err != nil {
		return err
	}
	if m := binary.LittleEndian.Uint64(head[:]); m != extMagic {
		return formats.Errorf(formats.ErrCorrupt, "Wrong parallels Format Extension magic: 0x%x, expected: 0x%x", m, uint64(extMagic))
	}
	// The cluster is read whole only once it lies within the file, which
	// bounds the allocation.
	if off+img.cluster > fileSize {
		return fmt.Errorf("%s: Format Extension cluster at %d past the end of the file (%d bytes): %w",
			img.f.Name(), off, fileSize, formats.ErrCorrupt)
	}
	ext := make([]byte, img.cluster)
	if _, err := img.f.ReadAt(ext, off); err != nil {
		return err
	}
	sum := md5.Sum(ext[extHeaderSize:])
	if !bytes.Equal(sum[:], ext[extChecksumStart:extHeaderSize]) {
		return formats.Errorf(formats.ErrCorrupt, "Wrong checksum in Format Extension header. Format extension is corrupted.")
	}
	le := binary.LittleEndian
	for pos := int64(extHeaderSize); ; {
		remaining := img.cluster - pos
		if remaining < featureSize {
			return formats.Errorf(formats.ErrCorrupt, "Can not read feature header, as remaining bytes (%d) in Format Extension is less than Feature header size (%d)", remaining, featureSize)
		}
		magic, size := le.Uint64(ext[pos:]), int64(le.Uint32(ext[pos+16:]))
		pos += featureSize
		if size > remaining-featureSize {
			return formats.Errorf(formats.ErrCorrupt, "Feature data_size exceedes Format Extension cluster")
		}
		switch magic {
		case featureEnd:
			return nil
		case featureBitmap:
		default:
			return formats.Errorf(formats.ErrUnsupported, "Unknown feature: 0x%x", magic)
		}
		pos = (pos + size + 7) &^ 7
	}
}
