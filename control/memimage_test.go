package control

import (
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// memImage is a writable in-memory image for the convert and create
// tests. It tracks allocation per 512-byte sector and logs every write,
// so tests can see what convert wrote, where and in which order.
type memImage struct {
	mu      sync.Mutex // guards all fields
	name    string
	data    []byte
	state   []sectorState
	backing formats.Image
	// unit is the compression unit; 0 means the image cannot compress.
	unit    int64
	log     []memWrite
	flushes int
	// failReadAt makes reads covering this offset fail (-1: never).
	failReadAt int64
}

type sectorState uint8

const (
	unallocated sectorState = iota
	allocatedData
	allocatedZero
	allocatedCompressed
)

// memWrite is one logged write: kind is "data", "zero" or "compressed".
type memWrite struct {
	kind    string
	off, n  int64
	payload []byte
}

var (
	_ formats.Image            = (*memImage)(nil)
	_ formats.Backed           = (*memImage)(nil)
	_ formats.Zeroer           = (*memImage)(nil)
	_ formats.CompressedWriter = (*memImage)(nil)
)

func newMemImage(name string, size int64) *memImage {
	return &memImage{name: name, data: make([]byte, size), state: make([]sectorState, (size+511)/512), failReadAt: -1}
}

// fill writes p at off as allocated data, bypassing the log.
func (m *memImage) fill(off int64, p []byte) {
	copy(m.data[off:], p)
	m.mark(off, int64(len(p)), allocatedData)
}

func (m *memImage) mark(off, n int64, s sectorState) {
	for i := off / 512; i < (off+n+511)/512; i++ {
		m.state[i] = s
	}
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failReadAt >= 0 && off <= m.failReadAt && m.failReadAt < off+int64(len(p)) {
		return 0, fmt.Errorf("injected read error")
	}
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && off+int64(n) < int64(len(m.data)) {
		o := off + int64(n)
		end := min((o/512+1)*512, int64(len(m.data)), off+int64(len(p)))
		if m.state[o/512] == unallocated && m.backing != nil && o < m.backing.Size() {
			k := min(end, m.backing.Size()) - o
			if _, err := m.backing.ReadAt(p[n:n+int(k)], o); err != nil && err != io.EOF {
				return n, err
			}
			n += int(k)
			continue
		}
		n += copy(p[n:], m.data[o:end])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off+int64(len(p)) > int64(len(m.data)) {
		return 0, fmt.Errorf("write past the end at %d", off)
	}
	copy(m.data[off:], p)
	m.mark(off, int64(len(p)), allocatedData)
	m.log = append(m.log, memWrite{kind: "data", off: off, n: int64(len(p))})
	return len(p), nil
}

func (m *memImage) WriteZeroes(off, n int64, mayUnmap bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	m.mark(off, n, allocatedZero)
	m.log = append(m.log, memWrite{kind: "zero", off: off, n: n})
	return nil
}

func (m *memImage) CompressionUnit() int64 { return m.unit }

// Compress "compresses" by dropping trailing zeroes; a cluster without
// trailing zeroes does not shrink.
func (m *memImage) Compress(dst, src []byte) ([]byte, bool) {
	n := len(src)
	for n > 0 && src[n-1] == 0 {
		n--
	}
	if n == len(src) {
		return nil, false
	}
	return append(dst[:0], src[:n]...), true
}

func (m *memImage) WriteCompressed(off int64, c []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off%m.unit != 0 {
		return fmt.Errorf("unaligned compressed write at %d", off)
	}
	n := min(m.unit, int64(len(m.data))-off)
	clear(m.data[off : off+n])
	copy(m.data[off:off+n], c)
	m.mark(off, n, allocatedCompressed)
	m.log = append(m.log, memWrite{kind: "compressed", off: off, n: n, payload: append([]byte(nil), c...)})
	return nil
}

func (m *memImage) BlockStatus(off, length int64) (formats.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	length = min(length, int64(len(m.data))-off)
	s := m.state[off/512]
	end := (off/512 + 1) * 512
	for end < off+length && m.state[end/512] == s {
		end += 512
	}
	e := formats.Extent{Length: min(end, off+length) - off}
	switch s {
	case allocatedData:
		e.Status = formats.StatusData
	case allocatedCompressed:
		e.Status = formats.StatusData | formats.StatusCompressed
	case allocatedZero:
		e.Status = formats.StatusZero
	}
	return e, nil
}

func (m *memImage) Size() int64 { return int64(len(m.data)) }
func (m *memImage) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return nil
}
func (m *memImage) Close() error                  { return nil }
func (m *memImage) Format() string                { return "memtest" }
func (m *memImage) Filename() string              { return m.name }
func (m *memImage) Backing() formats.Image        { return m.backing }
func (m *memImage) BackingInfo() (string, string) { return "", "" }

// memStore holds the images the memtest driver created, by file name.
var memStore = struct {
	sync.Mutex
	images map[string]*memImage
}{images: map[string]*memImage{}}

func memLookup(name string) *memImage {
	memStore.Lock()
	defer memStore.Unlock()
	return memStore.images[name]
}

// memCluster is the compression unit of memtest images.
const memCluster = 64 << 10

func init() {
	formats.Register(&formats.Driver{
		Name: "memtest",
		CreateOptions: []formats.OptionSpec{
			{Name: "size", Type: formats.OptSize},
			{Name: "backing_file", Type: formats.OptString},
			{Name: "backing_fmt", Type: formats.OptString},
			{Name: "cluster_size", Type: formats.OptSize, Default: "65536"},
		},
		CanCompress: true,
		Probe: func(buf []byte, filename string) int {
			if memLookup(filename) != nil {
				return 100
			}
			return 0
		},
		Create: func(filename string, opts *formats.Options) error {
			size, _ := opts.Uint("size")
			if size > 1<<30 {
				return fmt.Errorf("Could not resize file: %w", syscall.EFBIG)
			}
			f, err := formats.CreateFile(filename)
			if err != nil {
				return err
			}
			// A header, so that probing runs: QEMU takes an empty file
			// for raw without asking the drivers.
			_, err = f.WriteAt([]byte("memtest\n"), 0)
			f.Close()
			if err != nil {
				return err
			}
			img := newMemImage(filename, int64(size))
			img.unit = memCluster
			if b := opts.String("backing_file"); b != "" {
				img.backing = memLookup(formats.BackingPath(filename, b))
			}
			memStore.Lock()
			memStore.images[filename] = img
			memStore.Unlock()
			return nil
		},
		Open: func(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
			f.Close()
			img := memLookup(f.Name())
			if img == nil {
				return nil, fmt.Errorf("Image is not in memtest format: %w", formats.ErrWrongFormat)
			}
			return img, nil
		},
	})
}
