package qed

import (
	"fmt"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

var (
	_ formats.Resizer        = (*Image)(nil)
	_ formats.BackingChanger = (*Image)(nil)
)

// Resize is bdrv_qed_co_truncate: QED images only grow, and only by
// rewriting the size in the header; the tables already address up to
// the largest valid size.
func (img *Image) Resize(size int64, prealloc string, shrink bool) error {
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.f.Name(), formats.ErrReadOnly)
	}
	if prealloc != "" && prealloc != "off" {
		return formats.Errorf(formats.ErrUnsupported, "Unsupported preallocation mode '%s'", prealloc)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if size < 0 || !validImageSize(uint64(size), uint64(img.hdr.ClusterSize), uint64(img.hdr.TableSize)) {
		return formats.Errorf(formats.ErrInvalidOption, "Invalid image size specified")
	}
	if uint64(size) < img.hdr.ImageSize {
		return formats.Errorf(formats.ErrUnsupported, "Shrinking images is currently not supported")
	}
	old := img.hdr.ImageSize
	img.hdr.ImageSize = uint64(size)
	if err := img.writeHeader(); err != nil {
		img.hdr.ImageSize = old
		return fmt.Errorf("Failed to update the image size: %w", err)
	}
	img.size = size
	return nil
}

// SetBacking is bdrv_qed_change_backing_file: the header and the new
// name after it are rewritten in one write, which must fit in the
// header clusters; a raw format sets the no-probe feature.
func (img *Image) SetBacking(name, format string) error {
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.f.Name(), formats.ErrReadOnly)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hdr.CompatFeatures != 0 {
		// No compat feature is known, and one might live after the name.
		return formats.ErrnoError{Err: syscall.ENOTSUP}
	}
	h := *img.hdr
	h.Features &^= featBackingFile | featBackingNoProbe
	if name != "" {
		h.Features |= featBackingFile
		if format == "raw" {
			h.Features |= featBackingNoProbe
		}
	}
	h.BackingFilenameOffset = headerSize
	h.BackingFilenameSize = uint32(len(name))
	if uint64(headerSize+len(name)) > uint64(h.HeaderSize)*uint64(h.ClusterSize) {
		return formats.ErrnoError{Err: syscall.ENOSPC}
	}
	// Data written before must not pair with the new backing file.
	if err := img.f.Sync(); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(append(h.encode(), name...), 0); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	*img.hdr = h
	img.backingName, img.backingFormat = name, ""
	if h.Features&featBackingNoProbe != 0 {
		img.backingFormat = "raw"
	}
	return nil
}
