package control

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// RebaseOptions are the inputs of `rebase` (qemu-img.c img_rebase).
type RebaseOptions struct {
	// Image is the image to rebase, open read-write: with its backing
	// chain in safe mode, without it in unsafe mode. The caller closes
	// it.
	Image formats.Image
	// Backing is -b as given, stored in the header as it stands;
	// BackingGiven says whether -b was given at all (unsafe mode without
	// -b removes the backing file, as -b "" does).
	Backing      string
	BackingGiven bool
	// BackingFormat is -F.
	BackingFormat string
	// Unsafe is -u: only the header changes.
	Unsafe bool
	// Compress is -c (qemu-img 9.0): merged data is written as whole
	// compressed clusters.
	Compress bool
	// OpenBacking opens the new backing file read-only by its path
	// (resolved against the image's directory), with format ("" probes).
	OpenBacking func(path, format string) (formats.Image, error)
	// Progress is told, for every range whose old and new backing data
	// were compared, how many such ranges are done and qemu-img's count
	// of 2 MiB pieces of the image, which done may pass: img_rebase adds
	// 100/pieces percent per range and caps the sum at 100.
	Progress Progress
}

// RebaseChangeError is the failure of the final step, rewriting the
// backing reference, after the data (if any) was copied; qemu-img still
// draws 100% progress before it reports it.
type RebaseChangeError struct{ Err error }

func (e *RebaseChangeError) Error() string { return e.Err.Error() }
func (e *RebaseChangeError) Unwrap() error { return e.Err }

// Rebase changes the image's backing file as img_rebase does. In safe
// mode, every range the image does not allocate and where the old and
// the new backing chain read differently is first copied from the old
// chain into the image, so that the guest sees the same bytes before and
// after; with an empty Backing that is every range the old chain gives
// other than zeroes (flattening). When the new backing file is part of
// the old chain, ranges that nothing above it allocates are skipped
// without reading.
func Rebase(ctx context.Context, o RebaseOptions) error {
	img := o.Image
	if _, ok := img.(formats.CompressedWriter); o.Compress && !ok {
		return formats.Errorf(formats.ErrUnsupported, "Compression not supported for this file format")
	}
	if o.BackingFormat != "" && formats.Lookup(o.BackingFormat) == nil {
		return formats.Errorf(ErrInvalidArgument, "Invalid format name: '%s'", o.BackingFormat)
	}
	if !o.Unsafe {
		if err := rebaseData(ctx, &o); err != nil {
			return err
		}
	}
	if err := changeBacking(img, o.Backing, o.BackingFormat); err != nil {
		name := o.Backing
		if !o.BackingGiven {
			name = "(null)" // glibc's printf of the NULL qemu-img passes
		}
		return &RebaseChangeError{fmt.Errorf("Could not change the backing file to '%s': %w", name, err)}
	}
	return nil
}

// changeBacking is bdrv_change_backing_file's part of the rebase: a
// name needs a format, and formats without backing files refuse. The
// error text is the one qemu-img prints after the backing file name.
func changeBacking(img formats.Image, name, format string) error {
	if name == "" {
		format = ""
	} else if format == "" {
		return formats.Errorf(ErrInvalidArgument, "backing format must be specified")
	}
	bc, ok := img.(formats.BackingChanger)
	if !ok {
		return formats.ErrnoError{Err: syscall.ENOTSUP}
	}
	err := bc.SetBacking(name, format)
	var errno syscall.Errno
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.ENOSPC):
		return formats.Errorf(syscall.ENOSPC, "No space left in the file header")
	case errors.As(err, &errno):
		return formats.ErrnoError{Err: errno}
	}
	return formats.ErrnoError{Err: syscall.EIO}
}

// rebaseData is the safe mode's copy.
func rebaseData(ctx context.Context, o *RebaseOptions) error {
	img := o.Image
	chain := backingChain(img)
	var oldBacking formats.Image
	if len(chain) > 1 {
		oldBacking = chain[1]
	}
	var newBacking formats.Image
	// inChain: the new backing file is part of the old chain; above are
	// the images of the old chain over it.
	var inChain bool
	var above []formats.Image
	if o.Backing != "" {
		path := formats.BackingPath(img.Filename(), o.Backing)
		// qemu-img looks the resolved name up in the chain, where it is
		// resolved once more against each image.
		if i := findBackingImage(chain, path); i >= 0 {
			newBacking, above, inChain = chain[i], chain[1:i], true
		} else {
			b, err := o.OpenBacking(path, o.BackingFormat)
			if err != nil {
				return fmt.Errorf("Could not open new backing file '%s': %w", o.Backing, err)
			}
			defer b.Close()
			newBacking = b
		}
	}
	size := img.Size()
	var oldSize, newSize int64
	if oldBacking != nil {
		oldSize = oldBacking.Size()
	}
	if newBacking != nil {
		newSize = newBacking.Size()
	}
	var pieces int64
	if size != 0 {
		pieces = size / min(size, copyBufSize)
	}
	bufOld := make([]byte, min(size, copyBufSize))
	bufNew := make([]byte, len(bufOld))
	done := int64(0)
	for off, n := int64(0), int64(0); off < size; off += n {
		if err := ctx.Err(); err != nil {
			return err
		}
		n = min(copyBufSize, size-off)
		e, err := img.BlockStatus(off, n)
		if err != nil {
			return fmt.Errorf("error while reading image metadata: %s", errnoText(err))
		}
		if e.Length <= 0 {
			// A driver bug; stop rather than loop (EIO, as QEMU says).
			return fmt.Errorf("error while reading image metadata: %s", errnoText(formats.ErrCorrupt))
		}
		n = e.Length
		if e.Status.Allocated() {
			continue
		}
		if inChain {
			length, depth, _, err := allocatedAbove(above, off, n)
			if err != nil {
				return fmt.Errorf("error while reading image metadata: %s", errnoText(err))
			}
			n = length
			if depth < 0 {
				continue
			}
		}
		oldZero := off >= oldSize
		if oldZero {
			clear(bufOld[:n])
		} else {
			n = min(n, oldSize-off)
			if err := readFull(oldBacking, off, bufOld[:n]); err != nil {
				return errors.New("error while reading from old backing file")
			}
		}
		if off >= newSize {
			clear(bufNew[:n])
		} else {
			n = min(n, newSize-off)
			if err := readFull(newBacking, off, bufNew[:n]); err != nil {
				return errors.New("error while reading from new backing file")
			}
		}
		write := writeDifferences
		if cw, ok := img.(formats.CompressedWriter); ok && o.Compress {
			write = func(img formats.Image, off int64, old, new []byte, oldZero bool) error {
				return writeCompressedDifferences(img, cw, off, old, new, oldZero)
			}
		}
		if err := write(img, off, bufOld[:n], bufNew[:n], oldZero); err != nil {
			return fmt.Errorf("Error while writing to COW image: %s", errnoText(err))
		}
		done++
		o.Progress.report(done, pieces)
	}
	return nil
}

// writeDifferences writes the sectors where old and new differ, old's
// bytes (or zeroes, when the old backing ends before off), as
// compare_buffers splits them.
func writeDifferences(img formats.Image, off int64, old, new []byte, oldZero bool) error {
	for p := int64(0); p < int64(len(old)); {
		differ := !bytes.Equal(old[p:min(p+sectorSize, int64(len(old)))], new[p:min(p+sectorSize, int64(len(new)))])
		q := min(p+sectorSize, int64(len(old)))
		for q < int64(len(old)) {
			e := min(q+sectorSize, int64(len(old)))
			if !bytes.Equal(old[q:e], new[q:e]) != differ {
				break
			}
			q = e
		}
		if differ {
			var err error
			if oldZero {
				err = writeZeroesNoUnmap(img, off+p, q-p)
			} else {
				_, err = img.WriteAt(old[p:q], off+p)
			}
			if err != nil {
				return err
			}
		}
		p = q
	}
	return nil
}

// writeCompressedDifferences is writeDifferences for rebase -c: every
// cluster in which old and new differ is written whole and compressed,
// with the bytes the image shows now (qemu-img 9.0 aligns its writes to
// the cluster size for this). A cluster the image already allocates in
// part (extended L2 subclusters) cannot take a compressed write; it gets
// the plain sector writes.
func writeCompressedDifferences(img formats.Image, cw formats.CompressedWriter, off int64, old, new []byte, oldZero bool) error {
	cs := cw.CompressionUnit()
	end := off + int64(len(old))
	cluster := make([]byte, cs)
	var cbuf []byte
	for c := off &^ (cs - 1); c < end; c += cs {
		lo, hi := max(c, off)-off, min(c+cs, end)-off
		if bytes.Equal(old[lo:hi], new[lo:hi]) {
			continue
		}
		n := min(cs, img.Size()-c)
		e, err := img.BlockStatus(c, n)
		if err != nil {
			return err
		}
		if e.Status.Allocated() || e.Length < n {
			if err := writeDifferences(img, off+lo, old[lo:hi], new[lo:hi], oldZero); err != nil {
				return err
			}
			continue
		}
		clear(cluster)
		if err := readFull(img, c, cluster[:n]); err != nil {
			return err
		}
		if out, ok := cw.Compress(cbuf, cluster); ok {
			cbuf = out
			err = cw.WriteCompressed(c, out)
		} else {
			_, err = img.WriteAt(cluster[:n], c)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// writeZeroesNoUnmap zeroes a range the way blk_pwrite_zeroes without
// flags does: efficiently when the driver can, keeping the allocation.
func writeZeroesNoUnmap(img formats.Image, off, n int64) error {
	if z, ok := img.(formats.Zeroer); ok {
		return z.WriteZeroes(off, n, false)
	}
	return writeZeroes(img, off, n)
}

// errnoText is strerror of the error's errno, EIO for errors without
// one, as qemu-img's messages end.
func errnoText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return formats.ErrnoError{Err: errno}.Error()
	}
	return formats.ErrnoError{Err: syscall.EIO}.Error()
}
