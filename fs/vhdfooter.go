package fs

import (
	"bytes"

	"github.com/imgfs/imgfs/formats"
)

// A fixed VHD is raw data followed by a 512-byte footer: QEMU's probe
// looks at the head only and takes it for raw, so qemu-img needs -f vpc
// for it. The mount recognises the footer instead, because fixed VHDs
// are the usual form of Azure disks and, shown as raw, would expose
// the footer as the last sector of disk.

// vhdFooterMagic starts the footer (the VHD spec's cookie).
var vhdFooterMagic = []byte("conectix")

// hasVHDFooter reports whether f ends in a VHD footer.
func hasVHDFooter(f *formats.File) bool {
	size, err := f.Size()
	if err != nil || size < 1024 {
		return false
	}
	tail := make([]byte, len(vhdFooterMagic))
	if _, err := f.ReadAt(tail, size-512); err != nil {
		return false
	}
	return bytes.Equal(tail, vhdFooterMagic)
}

// mountFormat is the driver the mount opens path with: the probed one,
// except that a raw-probing file with a VHD footer is a fixed VHD.
func mountFormat(path string) string {
	f, err := formats.OpenFile(path, true, false)
	if err != nil {
		return "" // formats.Open reports the error
	}
	defer f.Close()
	d, err := formats.ProbeFile(f)
	if err == nil && d.Name == "raw" && hasVHDFooter(f) {
		return "vpc"
	}
	return ""
}
