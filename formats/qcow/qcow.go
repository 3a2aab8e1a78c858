// Package qcow is QEMU's original copy-on-write format, qcow version 1,
// as block/qcow.c reads and writes it: a 48-byte big-endian header, a
// backing file name, an L1 table of L2 table offsets and L2 tables of
// cluster offsets. A cluster is either stored plainly, cluster-aligned,
// or compressed with raw deflate (4 KiB window) and packed byte by byte
// after the previous data. New clusters and tables go at the end of the
// file; nothing is ever freed. Images encrypted with the legacy AES-CBC
// scheme need their passphrase (the encrypt.key-secret option) for
// guest I/O; compressed clusters are never encrypted, as in QEMU.
package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/luks"
)

func init() {
	formats.Register(&formats.Driver{
		Name:          "qcow",
		Probe:         probe,
		Open:          open,
		Create:        create,
		CreateOptions: createOptions,
		CanCompress:   true,
		RuntimeOptions: []formats.OptionSpec{
			{Name: "encrypt.format", Type: formats.OptString, Help: "Encryption data format"},
		},
	})
}

// probe is qcow_probe: the magic and version 1.
func probe(buf []byte, _ string) int {
	if len(buf) >= headerSize && binary.BigEndian.Uint32(buf) == magic && binary.BigEndian.Uint32(buf[4:]) == version {
		return 100
	}
	return 0
}

// maxMergeSteps bounds the clusters one BlockStatus call looks at.
const maxMergeSteps = 1 << 16

// l2CacheSize is how many L2 tables stay in memory (QEMU keeps 16).
const l2CacheSize = 16

// Image is an open qcow image. It is safe for concurrent use.
type Image struct {
	f        *formats.File
	readOnly bool
	hdr      *Header
	size     int64

	clusterBits uint
	clusterSize int64
	l2Bits      uint
	backingName string
	backing     formats.Image
	// crypt is set for encrypted images opened for I/O.
	crypt *luks.SectorCipher

	// mu guards l1, the L2 cache and every change of the file's layout:
	// lookups hold it while they read the tables, allocating writes for
	// the whole allocation, so that two writers never allocate the same
	// cluster twice.
	mu sync.Mutex
	l1 []uint64
	// l2 caches L2 tables by host offset; l2Order is their load order,
	// oldest first, for eviction.
	l2      map[uint64][]uint64
	l2Order []uint64

	// lastMu guards the last compressed cluster read: its L2 entry
	// (host offset and size) and its inflated content.
	lastMu    sync.Mutex
	lastEntry uint64
	lastData  []byte
}

var (
	_ formats.Image            = (*Image)(nil)
	_ formats.Backed           = (*Image)(nil)
	_ formats.Describer        = (*Image)(nil)
	_ formats.CompressedWriter = (*Image)(nil)
	_ formats.Emptier          = (*Image)(nil)
)

// errIO is what QEMU reports for requests outside the image and for
// entries it cannot use.
var errIO = formats.ErrnoError{Err: syscall.EIO}

// open is qcow_open: check the header, read the L1 table and the
// backing file name, and open the backing image.
func open(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	img, err := load(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	if img.backingName != "" && !o.NoBacking {
		b, err := formats.OpenBacking(f.Name(), img.backingName, "", o)
		if err != nil {
			f.Close()
			return nil, err
		}
		img.backing = b
	}
	return img, nil
}

func load(f *formats.File, o *formats.OpenOptions) (*Image, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, headerSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	h := decodeHeader(buf)
	if err := h.validate(fileSize); err != nil {
		return nil, err
	}
	if err := checkEncryptFormat(h, o); err != nil {
		return nil, err
	}
	var crypt *luks.SectorCipher
	if h.CryptMethod == cryptAES && !o.NoIO {
		if crypt, err = NewLegacyCipher(o.KeySecret, o.Secrets); err != nil {
			return nil, err
		}
	}
	img := &Image{
		f:           f,
		readOnly:    f.ReadOnly(),
		hdr:         h,
		size:        int64(h.Size/512) * 512,
		clusterBits: uint(h.ClusterBits),
		clusterSize: 1 << h.ClusterBits,
		l2Bits:      uint(h.L2Bits),
		l2:          map[uint64][]uint64{},
		crypt:       crypt,
	}
	raw := make([]byte, 8*h.l1Entries())
	if _, err := f.ReadAt(raw, int64(h.L1TableOffset)); err != nil {
		return nil, err
	}
	img.l1 = make([]uint64, h.l1Entries())
	for i := range img.l1 {
		img.l1[i] = binary.BigEndian.Uint64(raw[8*i:])
	}
	if h.BackingFileOffset != 0 {
		name := make([]byte, h.BackingFileSize)
		if _, err := f.ReadAt(name, int64(h.BackingFileOffset)); err != nil {
			return nil, err
		}
		img.backingName = string(name)
	}
	return img, nil
}

func (img *Image) Size() int64      { return img.size }
func (img *Image) Format() string   { return "qcow" }
func (img *Image) Filename() string { return img.f.Name() }

// Backing returns the open backing image, or nil.
func (img *Image) Backing() formats.Image { return img.backing }

// BackingInfo returns the stored backing file name; qcow stores no
// backing format.
func (img *Image) BackingInfo() (string, string) { return img.backingName, "" }

// Describe reports the cluster size and whether the image is encrypted.
func (img *Image) Describe() (*formats.Description, error) {
	return &formats.Description{ClusterSize: img.clusterSize, Encrypted: img.hdr.CryptMethod != cryptNone, HasDirtyFlag: true}, nil
}

// l2Entries is the number of entries of one L2 table.
func (img *Image) l2Entries() int64 { return 1 << img.l2Bits }

// l2Table returns the L2 table at host offset off, from the cache or the
// file. The caller holds mu.
func (img *Image) l2Table(off uint64) ([]uint64, error) {
	if t, ok := img.l2[off]; ok {
		return t, nil
	}
	raw := make([]byte, 8*img.l2Entries())
	if _, err := img.f.ReadAt(raw, int64(off)); err != nil {
		return nil, fmt.Errorf("%s: reading L2 table at %#x: %w", img.f.Name(), off, err)
	}
	t := make([]uint64, img.l2Entries())
	for i := range t {
		t[i] = binary.BigEndian.Uint64(raw[8*i:])
	}
	img.cacheL2(off, t)
	return t, nil
}

// cacheL2 adds a table to the cache, evicting the oldest when full. The
// caller holds mu.
func (img *Image) cacheL2(off uint64, t []uint64) {
	if len(img.l2Order) == l2CacheSize {
		delete(img.l2, img.l2Order[0])
		img.l2Order = img.l2Order[1:]
	}
	img.l2[off] = t
	img.l2Order = append(img.l2Order, off)
}

// lookup returns the L2 entry for guest offset off (0 when unallocated).
// The caller holds mu.
func (img *Image) lookup(off int64) (uint64, error) {
	l2off := img.l1[off>>(img.clusterBits+img.l2Bits)]
	if l2off == 0 {
		return 0, nil
	}
	t, err := img.l2Table(l2off)
	if err != nil {
		return 0, err
	}
	return t[(off>>img.clusterBits)&(img.l2Entries()-1)], nil
}

// compressedLoc splits a compressed L2 entry into host offset and size.
func (img *Image) compressedLoc(e uint64) (off uint64, size int64) {
	shift := 63 - img.clusterBits
	return e & (1<<shift - 1), int64(e>>shift) & (img.clusterSize - 1)
}

// ReadAt reads guest bytes: allocated clusters from the file, compressed
// ones inflated, unallocated ones from the backing image or as zeroes.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d: %w", img.f.Name(), off, errIO)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), img.size-off))
	for done := 0; done < n; {
		pos := off + int64(done)
		inCluster := pos & (img.clusterSize - 1)
		k := int(min(int64(n-done), img.clusterSize-inCluster))
		if err := img.readCluster(p[done:done+k], pos); err != nil {
			return done, err
		}
		done += k
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readCluster reads p (inside one cluster) at guest offset pos.
func (img *Image) readCluster(p []byte, pos int64) error {
	img.mu.Lock()
	e, err := img.lookup(pos)
	img.mu.Unlock()
	if err != nil {
		return err
	}
	inCluster := pos & (img.clusterSize - 1)
	switch {
	case e == 0:
		return formats.ReadBacking(img.backing, p, pos)
	case e&oflagCompressed != 0:
		data, err := img.readCompressed(e, pos)
		if err != nil {
			return err
		}
		copy(p, data[inCluster:])
		return nil
	case e&511 != 0:
		return fmt.Errorf("%s: cluster offset %#x for guest offset %#x is not sector aligned: %w: %w",
			img.f.Name(), e, pos, formats.ErrCorrupt, syscall.EIO)
	}
	if img.crypt == nil {
		_, err = img.f.ReadAt(p, int64(e)+inCluster)
		return err
	}
	// Encrypted data is read and decrypted in whole sectors.
	start, end := inCluster&^511, alignUp(inCluster+int64(len(p)), 512)
	buf := make([]byte, end-start)
	if _, err := img.f.ReadAt(buf, int64(e)+start); err != nil {
		return err
	}
	img.crypt.Decrypt(buf, uint64(pos-inCluster+start)/luks.SectorSize)
	copy(p, buf[inCluster-start:])
	return nil
}

// WriteAt writes guest bytes, allocating clusters at the end of the file
// as qcow_co_pwritev does. A write that does not fit in Size fails as a
// whole.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	if img.crypt != nil {
		return img.writeEncrypted(p, off)
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		inCluster := pos & (img.clusterSize - 1)
		k := int(min(int64(len(p)-done), img.clusterSize-inCluster))
		host, err := img.writableCluster(pos, int64(k))
		if err != nil {
			return done, err
		}
		if _, err := img.f.WriteAt(p[done:done+k], host+inCluster); err != nil {
			return done, err
		}
		done += k
	}
	return len(p), nil
}

// writeEncrypted writes p at off in whole encrypted sectors, reading
// the partial sectors at either end first. Like QEMU, which aligns
// requests to sectors for all qcow images, it does not serialise two
// unaligned writes sharing a sector.
func (img *Image) writeEncrypted(p []byte, off int64) (int, error) {
	// Size is a whole number of sectors, so end is inside the image.
	start, end := off&^511, alignUp(off+int64(len(p)), 512)
	buf := make([]byte, end-start)
	head := start < off
	if head {
		if _, err := img.ReadAt(buf[:512], start); err != nil {
			return 0, err
		}
	}
	if end > off+int64(len(p)) && !(head && end-512 == start) {
		if _, err := img.ReadAt(buf[len(buf)-512:], end-512); err != nil {
			return 0, err
		}
	}
	copy(buf[off-start:], p)
	for done := int64(0); done < int64(len(buf)); {
		pos := start + done
		inCluster := pos & (img.clusterSize - 1)
		k := min(int64(len(buf))-done, img.clusterSize-inCluster)
		host, err := img.writableCluster(pos, k)
		if err != nil {
			return 0, err
		}
		piece := buf[done : done+k]
		img.crypt.Encrypt(piece, uint64(pos)/luks.SectorSize)
		if _, err := img.f.WriteAt(piece, host+inCluster); err != nil {
			return 0, err
		}
		done += k
	}
	return len(p), nil
}

func (img *Image) checkWrite(off, n int64) error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	if off < 0 || off > img.size || n > img.size-off {
		return fmt.Errorf("%s: write of %d bytes at offset %d outside the image (%d bytes): %w",
			img.f.Name(), n, off, img.size, errIO)
	}
	return nil
}

// writableCluster returns the host offset of the plain cluster holding
// guest offset pos, allocating it when there is none. A write of n
// bytes that does not cover the cluster keeps the rest of its content:
// a compressed cluster's, or the backing image's for an unallocated one.
// (QEMU copies nothing from the backing image here and relies on its
// 512-byte clusters, which the block layer fills by read-modify-write;
// an image made elsewhere with larger clusters would lose data.)
func (img *Image) writableCluster(pos, n int64) (int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	e, err := img.lookup(pos)
	if err != nil {
		return 0, err
	}
	if e != 0 && e&oflagCompressed == 0 {
		if e&511 != 0 {
			return 0, fmt.Errorf("%s: cluster offset %#x for guest offset %#x is not sector aligned: %w: %w",
				img.f.Name(), e, pos, formats.ErrCorrupt, syscall.EIO)
		}
		return int64(e), nil
	}
	var old []byte
	switch {
	case n == img.clusterSize:
	case e&oflagCompressed != 0:
		if old, err = img.readCompressed(e, pos); err != nil {
			return 0, err
		}
	case img.backing != nil:
		old = make([]byte, img.clusterSize)
		if err := formats.ReadBacking(img.backing, old, pos&^(img.clusterSize-1)); err != nil {
			return 0, err
		}
	case img.crypt != nil:
		// The file's zeroes would not decrypt to zeroes.
		old = make([]byte, img.clusterSize)
	}
	if old != nil && img.crypt != nil {
		// A copy: old may be the cached inflated cluster.
		old = append([]byte(nil), old...)
		img.crypt.Encrypt(old, uint64(pos&^(img.clusterSize-1))/luks.SectorSize)
	}
	t, l2off, err := img.writableL2(pos)
	if err != nil {
		return 0, err
	}
	end, err := img.f.Size()
	if err != nil {
		return 0, err
	}
	host := alignUp(end, img.clusterSize)
	if old != nil {
		if _, err := img.f.WriteAt(old, host); err != nil {
			return 0, err
		}
	} else if err := img.f.Truncate(host + img.clusterSize); err != nil {
		return 0, fmt.Errorf("%s: growing the file for a new cluster: %w", img.f.Name(), err)
	}
	return host, img.setL2(t, l2off, pos, uint64(host))
}

// writableL2 returns the L2 table covering guest offset pos and its host
// offset, allocating a zeroed one at the end of the file when the L1
// entry is empty. The new table reaches the disk before the L1 entry
// that points to it. The caller holds mu.
func (img *Image) writableL2(pos int64) ([]uint64, uint64, error) {
	i := pos >> (img.clusterBits + img.l2Bits)
	if l2off := img.l1[i]; l2off != 0 {
		t, err := img.l2Table(l2off)
		return t, l2off, err
	}
	end, err := img.f.Size()
	if err != nil {
		return nil, 0, err
	}
	l2off := uint64(alignUp(end, img.clusterSize))
	if _, err := img.f.WriteAt(make([]byte, 8*img.l2Entries()), int64(l2off)); err != nil {
		return nil, 0, err
	}
	if err := img.f.Sync(); err != nil {
		return nil, 0, err
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], l2off)
	if _, err := img.f.WriteAt(b[:], int64(img.hdr.L1TableOffset)+8*i); err != nil {
		return nil, 0, err
	}
	if err := img.f.Sync(); err != nil {
		return nil, 0, err
	}
	img.l1[i] = l2off
	t := make([]uint64, img.l2Entries())
	img.cacheL2(l2off, t)
	return t, l2off, nil
}

// setL2 stores entry e for guest offset pos in table t (at host offset
// l2off), in memory and on disk. It does not flush: a crash before the
// next Flush can at worst lose the cluster's data, which then reads as
// the zeroes the grown file holds, while metadata stays consistent,
// since L2 tables reach the disk before the L1 entries that point to
// them. The caller holds mu.
func (img *Image) setL2(t []uint64, l2off uint64, pos int64, e uint64) error {
	j := (pos >> img.clusterBits) & (img.l2Entries() - 1)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], e)
	if _, err := img.f.WriteAt(b[:], int64(l2off)+8*j); err != nil {
		return err
	}
	t[j] = e
	return nil
}

func alignUp(n, a int64) int64 { return (n + a - 1) &^ (a - 1) }

// BlockStatus is qcow_co_block_status: plain clusters are data at their
// host offset, compressed clusters data without one, unallocated
// clusters belong to the backing image. Runs of clusters with the same
// status merge, plain ones while their host offsets are contiguous.
func (img *Image) BlockStatus(off, length int64) (formats.Extent, error) {
	if off < 0 || length < 0 {
		return formats.Extent{}, fmt.Errorf("%s: block status of %d bytes at offset %d: %w", img.f.Name(), length, off, errIO)
	}
	length = min(length, max(img.size-off, 0))
	if length == 0 {
		return formats.Extent{}, nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	status := func(pos int64) (formats.Status, int64, error) {
		e, err := img.lookup(pos)
		switch {
		case err != nil:
			return 0, 0, err
		case e == 0:
			return 0, 0, nil
		case e&oflagCompressed != 0:
			return formats.StatusData | formats.StatusCompressed, 0, nil
		case img.hdr.CryptMethod != cryptNone:
			// The file holds ciphertext: no raw mapping to report.
			return formats.StatusData, 0, nil
		}
		return formats.StatusData | formats.StatusOffsetValid, int64(e) + pos&(img.clusterSize-1), nil
	}
	st, host, err := status(off)
	if err != nil {
		return formats.Extent{}, err
	}
	// An empty L1 entry is skipped whole; merging stops after
	// maxMergeSteps lookups so a huge image answers quickly (the caller
	// asks again for the rest).
	l1Span := int64(1) << (img.clusterBits + img.l2Bits)
	n := min(length, img.clusterSize-off&(img.clusterSize-1))
	for steps := 0; n < length && steps < maxMergeSteps; steps++ {
		pos := off + n
		if st == 0 && img.l1[pos/l1Span] == 0 {
			n += min(length-n, l1Span-pos%l1Span)
			continue
		}
		s, h, err := status(pos)
		if err != nil || s != st || st&formats.StatusOffsetValid != 0 && h != host+n {
			break
		}
		n += min(length-n, img.clusterSize)
	}
	e := formats.Extent{Length: n, Status: st}
	if st&formats.StatusOffsetValid != 0 {
		e.Offset, e.File = host, img.f.Name()
	}
	return e, nil
}

// MakeEmpty is qcow_make_empty: clear the L1 table and cut the file
// after it.
func (img *Image) MakeEmpty() error {
	if img.readOnly {
		return formats.ErrReadOnly
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	n := int64(8 * len(img.l1))
	if _, err := img.f.WriteAt(make([]byte, n), int64(img.hdr.L1TableOffset)); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	if err := img.f.Truncate(int64(img.hdr.L1TableOffset) + n); err != nil {
		return err
	}
	clear(img.l1)
	img.l2 = map[uint64][]uint64{}
	img.l2Order = nil
	// Host offsets are reused from now on.
	img.lastMu.Lock()
	img.lastData = nil
	img.lastMu.Unlock()
	return nil
}

// Flush makes completed writes durable.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	return img.f.Sync()
}

// Close closes the backing image and the file.
func (img *Image) Close() error {
	var berr error
	if img.backing != nil {
		berr = img.backing.Close()
	}
	if err := img.f.Close(); err != nil {
		return err
	}
	return berr
}
