// Package raw is the raw image format: the guest sees the host file's
// bytes as they are. It follows QEMU's raw format driver
// (block/raw-format.c) stacked on its file protocol (block/file-posix.c):
// the virtual size is the file size rounded up to a 512-byte sector, block
// status comes from SEEK_DATA/SEEK_HOLE, and an image whose format was
// guessed refuses writes that would make its first sector look like
// another format. The runtime options offset and size make the image a
// window of the file.
package raw

import (
	"errors"
	"fmt"
	"io"
	"math"
	"sync"

	"github.com/imgfs/imgfs/formats"
	"golang.org/x/sys/unix"
)

// sectorSize is BDRV_SECTOR_SIZE: sizes are rounded up to it, and a
// probed image protects its first sector.
const sectorSize = 512

func init() {
	formats.Register(&formats.Driver{
		Name:    "raw",
		Probe:   probe,
		Open:    open,
		Create:  create,
		Measure: measure,
		// raw's own table has only the size; the file protocol's options
		// follow (formats.ProtocolOptions).
		CreateOptions: []formats.OptionSpec{
			{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
		},
		RuntimeOptions: runtimeOptions,
	})
}

// runtimeOptions are raw-format.c's raw_runtime_opts: the image is the
// size bytes of the file from offset on (to the end of the file when
// size is not given).
var runtimeOptions = []formats.OptionSpec{
	{Name: "offset", Type: formats.OptSize, Help: "offset in the disk where the image starts", Strong: true},
	{Name: "size", Type: formats.OptSize, Help: "virtual disk size", Strong: true},
}

// probe gives every file the smallest positive score, so raw is chosen
// exactly when no other driver recognises the file.
func probe([]byte, string) int { return 1 }

// Image is an open raw image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	// probed: the format was guessed, so writes to the first sector are
	// checked (see guardSector0).
	probed bool
	// offset is where guest byte 0 lies in the file; fixedSize: the
	// size option fixed the size, so the image cannot be resized.
	offset    int64
	fixedSize bool

	// mu guards size: reads, writes and block status hold it shared so
	// that Resize, which holds it exclusively, never races a request
	// that checked the old size.
	mu   sync.RWMutex
	size int64

	// sector0 serialises writes that touch the first sector of a probed
	// image, so the content checked is the content written.
	sector0 sync.Mutex
}

// Compile-time checks of the capabilities Image claims.
var (
	_ formats.Image     = (*Image)(nil)
	_ formats.Zeroer    = (*Image)(nil)
	_ formats.Discarder = (*Image)(nil)
	_ formats.Resizer   = (*Image)(nil)
	_ formats.Describer = (*Image)(nil)
)

// probedWarning is QEMU's warning (raw_open in block/raw-format.c) for a
// writable image whose format was guessed.
const probedWarning = "WARNING: Image format was not specified for '%s' and probing guessed raw.\n" +
	"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
	"         Specify the 'raw' format explicitly to remove the restrictions."

func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("Could not get image size: %w", formats.ErrnoError{Err: err})
	}
	img := &Image{f: f, readOnly: f.ReadOnly(), probed: o.Probed}
	if err := img.window(o, size); err != nil {
		f.Close()
		return nil, err
	}
	if img.probed && !img.readOnly && o.Warn != nil {
		o.Warn(fmt.Sprintf(probedWarning, f.Name()))
	}
	return img, nil
}

// window sets offset and size from the runtime options and the file
// size, with raw_apply_options' checks.
func (img *Image) window(o *formats.OpenOptions, fileSize int64) error {
	rt, err := o.RuntimeValues(runtimeOptions)
	if err != nil {
		return err
	}
	offset, _ := rt.Uint("offset")
	size, hasSize := rt.Uint("size")
	hasSize = hasSize && rt.Has("size")
	if offset > uint64(fileSize) {
		return fmt.Errorf("Offset (%d) cannot be greater than size of the containing file (%d)", offset, fileSize)
	}
	if hasSize && uint64(fileSize)-offset < size {
		// QEMU's message has the double space.
		return fmt.Errorf("The sum of offset (%d) and size (%d) has to be smaller or equal to the  actual size of the containing file (%d)",
			offset, size, fileSize)
	}
	if hasSize && size%sectorSize != 0 {
		return fmt.Errorf("Specified size is not multiple of %d", sectorSize)
	}
	img.offset, img.fixedSize = int64(offset), hasSize
	if hasSize {
		img.size = int64(size)
	} else {
		img.size = roundUp(fileSize - img.offset)
	}
	return nil
}

// roundUp rounds a file size up to whole sectors, as QEMU counts a raw
// image's length in sectors.
func roundUp(n int64) int64 { return (n + sectorSize - 1) &^ (sectorSize - 1) }

// Size is the virtual size: the file size rounded up to 512 bytes.
func (img *Image) Size() int64 {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.size
}

func (img *Image) Format() string   { return "raw" }
func (img *Image) Filename() string { return img.f.Name() }

// errIO is what QEMU reports for a request outside the image.
var errIO = formats.ErrnoError{Err: unix.EIO}

// ReadAt reads guest bytes. Bytes between the end of the file and the
// end of its last sector read as zeroes; reads stop at Size with io.EOF.
// Guest offsets are file offsets shifted by the offset option.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, errIO)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), img.size-off))
	if _, err := img.f.ReadAt(p[:n], img.offset+off); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes guest bytes. A write that does not fit in Size fails
// as a whole, as QEMU fails it with EIO.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if img.probed && off < sectorSize {
		img.sector0.Lock()
		defer img.sector0.Unlock()
		head := make([]byte, sectorSize)
		if _, err := img.f.ReadAt(head, img.offset); err != nil {
			return 0, err
		}
		n := copy(head[off:], p)
		if err := guardSector0(head); err != nil {
			return 0, err
		}
		// Write the checked copy, not p, which the caller might change.
		if _, err := img.f.WriteAt(head[off:off+int64(n)], img.offset+off); err != nil {
			return 0, err
		}
		m, err := img.f.WriteAt(p[n:], img.offset+off+int64(n))
		return n + m, err
	}
	return img.f.WriteAt(p, img.offset+off)
}

// HostMap maps guest bytes one to one onto the file (from the offset
// option on), for copy offloading. The first sector of a probed image
// is not mapped: writes there need the probe guard of WriteAt.
func (img *Image) HostMap(off, n int64) (*formats.File, int64, int64, bool) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	if off < 0 || n <= 0 || off >= img.size || img.probed && off < sectorSize {
		return nil, 0, 0, false
	}
	return img.f, img.offset + off, min(n, img.size-off), true
}

// checkWrite refuses writes to a read-only image and ranges outside the
// image. The caller holds mu.
func (img *Image) checkWrite(off, length int64) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if off < 0 || length < 0 || off > img.size || length > img.size-off {
		return fmt.Errorf("write of %d bytes at offset %d outside the image (%d bytes): %w",
			length, off, img.size, errIO)
	}
	return nil
}

// errProbedWrite is QEMU's answer (raw_co_pwritev) to a write that would
// change what a probed image probes as.
var errProbedWrite = formats.ErrnoError{Err: unix.EPERM}

// guardSector0 refuses a new first sector of a probed image that would
// probe as another format, so a guest cannot turn its disk into, say, a
// qcow2 image naming a host file as its backing file. Probing looks at
// the content alone, without the file name.
func guardSector0(sector []byte) error {
	if d := formats.Probe(sector, ""); d != nil && d.Name != "raw" {
		return errProbedWrite
	}
	return nil
}

// guardZeroes is guardSector0 for a range [off, off+length) about to
// read as zeroes; the caller holds img.sector0.
func (img *Image) guardZeroes(off, length int64) error {
	head := make([]byte, sectorSize)
	if _, err := img.f.ReadAt(head, img.offset); err != nil {
		return err
	}
	clear(head[off:min(off+length, sectorSize)])
	return guardSector0(head)
}

// BlockStatus reports whether the file has data or a hole at off. Every
// byte of a raw image is allocated in this layer: holes read as zeroes.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	img.mu.RLock()
	size := img.size
	img.mu.RUnlock()
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("block status of %d bytes at offset %d: %w", length, off, errIO)
	}
	length = min(length, max(size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	host := img.offset + off
	data, n, err := img.f.DataStatus(host, length)
	if err != nil {
		return formats.Extent{}, err
	}
	st := formats.StatusZero
	if data {
		st = formats.StatusData
	}
	return formats.Extent{Length: n, Status: st | formats.StatusOffsetValid, Offset: host, File: img.f.Name()}, nil
}

// WriteZeroes makes [off, off+length) read as zeroes: with mayUnmap by
// punching a hole, otherwise by FALLOC_FL_ZERO_RANGE, falling back to
// writing zeroes where the file system supports neither, as file-posix's
// write-zeroes handlers do.
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	img.mu.RLock()
	defer img.mu.RUnlock()
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if img.probed && off < sectorSize {
		img.sector0.Lock()
		defer img.sector0.Unlock()
		if err := img.guardZeroes(off, length); err != nil {
			return err
		}
	}
	host := img.offset + off
	if mayUnmap {
		err := img.f.PunchHole(host, length)
		if !fallback(err) {
			return err
		}
	}
	err := img.f.ZeroRange(host, length)
	if !fallback(err) {
		return err
	}
	return writeZeroBuffers(img.f, host, length)
}

// fallback reports whether a fallocate error means "not supported here,
// try the next way" (file-posix treats EINVAL from unaligned ranges on
// some file systems the same).
func fallback(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EBUSY)
}

// zeroChunk bounds the buffer writeZeroBuffers allocates.
const zeroChunk = 1 << 20

// writeZeroBuffers writes zeroes into [off, off+length) with plain writes.
func writeZeroBuffers(f *formats.File, off, length int64) error {
	buf := make([]byte, min(length, zeroChunk))
	for length > 0 {
		n := min(length, int64(len(buf)))
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Discard deallocates a range; it reads as zeroes afterwards.
func (img *Image) Discard(off, length int64) error {
	return img.WriteZeroes(off, length, true)
}

// Resize changes the file size to exactly the offset option plus size,
// as raw_co_truncate does; an image whose size option fixed its size
// cannot be resized. Growing fills the new part according to prealloc
// (off, falloc or full; "" is off); shrinking needs shrink and no
// preallocation.
func (img *Image) Resize(size int64, prealloc string, shrink bool) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if size < img.size && !shrink {
		return errors.New("Use the --shrink option to perform a shrink operation.")
	}
	if img.fixedSize {
		return formats.Errorf(formats.ErrUnsupported, "Cannot resize fixed-size raw disks")
	}
	if size > math.MaxInt64-img.offset {
		return formats.Errorf(formats.ErrInvalidOption, "Disk size too large for the chosen offset")
	}
	if err := TruncateFile(img.f, img.offset+size, prealloc); err != nil {
		return err
	}
	img.size = roundUp(size)
	return nil
}

// Describe reports what info shows for raw: nothing but the dirty flag,
// which QEMU always reports (as false) for formats that answer
// bdrv_get_info.
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{HasDirtyFlag: true}, nil
}

// Flush makes completed writes durable.
func (img *Image) Flush() error { return img.f.Sync() }

// Close closes the file.
func (img *Image) Close() error { return img.f.Close() }
