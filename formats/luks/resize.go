package luks

import (
	"fmt"
	"math"
	"syscall"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/raw"
)

// Resize makes the payload size bytes long, as block_crypto_co_truncate
// does: it truncates the host file to the payload offset plus exactly
// size, with prealloc handed to the file protocol (off, falloc, full;
// "" is off). The LUKS1 header records no size, so it stays as it is.
// Nothing is written into a grown range: it decrypts whatever the file
// holds there (zeroes, or what falloc and full leave), which is noise,
// exactly what QEMU reads. A size that is not a whole number of sectors
// leaves a partial last sector, which reads as a whole one.
func (img *Image) Resize(size int64, prealloc string, shrink bool) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if size < 0 || size > math.MaxInt64-img.payload {
		return fmt.Errorf("resize to %d bytes after a %d-byte header: %w", size, img.payload, syscall.EFBIG)
	}
	if size < img.size.Load() && !shrink {
		return formats.Errorf(formats.ErrInvalidOption, "Use the --shrink option to perform a shrink operation.")
	}
	if err := raw.TruncateFile(img.f, img.payload+size, prealloc); err != nil {
		return err
	}
	img.size.Store(payloadSize(img.payload+size, img.payload))
	return nil
}
