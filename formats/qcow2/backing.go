package qcow2

import (
	"fmt"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

var (
	_ formats.BackingChanger = (*Image)(nil)
	_ formats.Emptier        = (*Image)(nil)
)

// SetBacking records a new backing file name and format in the header
// (qcow2_change_backing_file); name "" removes both. Cached metadata and
// data reach the disk before the header changes.
func (img *Image) SetBacking(name, format string) error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if name != "" && (img.hdr.AutoclearFeatures&AutoclearDataFileRaw != 0 || len(name) > maxBackingNameLen) {
		// A raw data file alone must make sense of the content.
		return formats.ErrnoError{Err: syscall.EINVAL}
	}
	if name == "" && format != "" {
		return formats.ErrnoError{Err: syscall.EINVAL}
	}
	if err := img.flushCaches(); err != nil {
		return err
	}
	if img.data != img.file {
		if err := img.data.Sync(); err != nil {
			return err
		}
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	oldName, oldFormat := img.hdr.BackingFile, img.hdr.BackingFormat
	img.hdr.BackingFile, img.hdr.BackingFormat = name, format
	if _, err := img.hdr.Encode(); err != nil {
		img.hdr.BackingFile, img.hdr.BackingFormat = oldName, oldFormat
		return formats.ErrnoError{Err: syscall.ENOSPC}
	}
	return img.writeHeader()
}

// MakeEmpty drops every cluster so that the image reads entirely as its
// backing file (qcow2_make_empty's general path: a full discard of the
// whole virtual size, here without allocating L2 tables that do not
// exist; QEMU's shortcut of rebuilding a v3 image from scratch is not
// reproduced, so the file keeps its emptied tables).
func (img *Image) MakeEmpty() error {
	img.freeMu.Lock()
	defer img.freeMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return fmt.Errorf("%s: %w", img.file.Name(), formats.ErrReadOnly)
	}
	if err := img.markBitmapsInUse(); err != nil {
		return err
	}
	if err := img.beforeMetadataWrite(); err != nil {
		return err
	}
	cs := img.lay.ClusterSize
	return img.fullDiscard(0, (img.size+cs-1)&^(cs-1), false)
}
