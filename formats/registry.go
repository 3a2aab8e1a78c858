package formats

import (
	"fmt"

	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// ProbeSize is how many leading bytes of a file probing looks at: QEMU's
// BLOCK_PROBE_BUF_SIZE, one sector. raw-format.c relies on it being the
// sector a probed raw image protects.
const ProbeSize = 512

// Driver is one image format.
type Driver struct {
	Name string
	// Probe scores how likely buf (the file's first ProbeSize bytes, fewer
	// for a short file) is an image of this format: 0 no, 100 certain.
	// Raw scores 1 so it wins only when nothing else claims the file.
	Probe func(buf []byte, filename string) int
	// Open opens an image from its host file. The driver owns f from then
	// on and closes it in Image.Close, also when Open fails.
	Open func(f *File, o *OpenOptions) (Image, error)
	// Create makes a new image. opts holds values for CreateOptions.
	Create func(filename string, opts *Options) error
	// CreateOptions are the -o options, in QEMU's table order.
	CreateOptions []OptionSpec
	// AmendOptions are the options `amend -o` takes, in QEMU's table
	// order; nil when the driver's images cannot be amended (they then
	// do not implement Amender).
	AmendOptions []OptionSpec
	// ReadOnly drivers (dmg, bochs, cloop) refuse writes and creation.
	ReadOnly bool
	// CanCompress: the driver's images implement CompressedWriter.
	// convert -c checks it before creating the target, as QEMU checks
	// block_driver_can_compress.
	CanCompress bool
	// Measure tells how large a new image of this format would be on
	// disk (QEMU's bdrv_measure): opts holds the -o options and the
	// size; src, when not nil, is the image whose content the new one
	// would get, and its size replaces opts' size. nil when the format
	// cannot measure.
	Measure func(opts *Options, src Image) (*MeasureResult, error)
}

// MeasureResult is QAPI's BlockMeasureInfo: the file size a new image
// needs for its content (Required) and with every cluster allocated
// (FullyAllocated), plus, when HasBitmaps, the space for the source's
// persistent bitmaps.
type MeasureResult struct {
	Required       int64
	FullyAllocated int64
	Bitmaps        int64
	HasBitmaps     bool
}

var (
	registryMu sync.RWMutex // guards drivers
	drivers    = map[string]*Driver{}
)

// Register adds a driver; drivers call it from init.
func Register(d *Driver) {
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := drivers[d.Name]; dup {
		panic("formats: driver registered twice: " + d.Name)
	}
	drivers[d.Name] = d
}

// Lookup returns the driver named name, or nil.
func Lookup(name string) *Driver {
	registryMu.RLock()
	defer registryMu.RUnlock()
	return drivers[name]
}

// Drivers returns every registered driver, sorted by name.
func Drivers() []*Driver {
	registryMu.RLock()
	defer registryMu.RUnlock()
	out := make([]*Driver, 0, len(drivers))
	for _, d := range drivers {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Probe returns the driver whose probe scores buf highest. The lowest
// non-zero score (raw) wins only when nothing else claims the file.
func Probe(buf []byte, filename string) *Driver {
	var best *Driver
	bestScore := 0
	for _, d := range Drivers() {
		if d.Probe == nil {
			continue
		}
		if s := d.Probe(buf, filename); s > bestScore {
			best, bestScore = d, s
		}
	}
	return best
}

// ProbeFile reads the head of f and probes it, as QEMU's
// find_image_format does: an empty file is raw without probing, and a
// file shorter than ProbeSize is probed padded with zeroes.
func ProbeFile(f *File) (*Driver, error) {
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	if d := Lookup("raw"); size == 0 && d != nil {
		return d, nil
	}
	buf := make([]byte, ProbeSize)
	if _, err := f.ReadAt(buf, 0); err != nil {
		return nil, err
	}
	d := Probe(buf, f.Name())
	if d == nil {
		return nil, fmt.Errorf("Could not determine image format: %w", ErrWrongFormat)
	}
	return d, nil
}

// OpenOptions controls how an image and its backing chain are opened.
type OpenOptions struct {
	// Format is the driver name; "" probes the content.
	Format string
	// ReadOnly opens without write access (the backing chain is always
	// read-only).
	ReadOnly bool
	// NoBacking leaves the backing image closed (qemu-img's -u and
	// info without --backing-chain still read the header's name).
	NoBacking bool
	// ForceShare lets others write the image while we have it open (-U):
	// we still take our own locks but forbid nothing.
	ForceShare bool
	// NoIO opens for metadata only (qemu-img info), needing no read
	// permission from the lock protocol.
	NoIO bool
	// Resize asks for the resize permission too (qemu-img resize).
	Resize bool
	// Direct opens host files with O_DIRECT.
	Direct bool
	// Check opens the image for `qemu-img check` (QEMU's BDRV_O_CHECK):
	// a writable image left dirty is not repaired on open, the check
	// reports and repairs it.
	Check bool
	// Warn receives warnings QEMU prints on stderr, e.g. about probed
	// raw images. nil discards them.
	Warn func(msg string)
	// Secrets holds the data of --object secret definitions by id;
	// KeySecret names the one holding an encrypted image's passphrase
	// (the luks driver's key-secret open option).
	Secrets   map[string][]byte
	KeySecret string
	// Probed is set by Open when the format was guessed; drivers use it
	// (raw refuses writes that would change the probe result).
	Probed bool

	// depth counts backing levels while opening a chain; seen holds the
	// canonical paths already in the chain, to refuse loops.
	depth int
	seen  map[string]bool
}

// MaxChainDepth bounds backing chains, against hostile images that
// reference themselves through many names.
const MaxChainDepth = 512

// Open opens filename with the given options, probing the format when
// none is given, and opens its backing chain.
func Open(filename string, o OpenOptions) (Image, error) {
	if o.seen == nil {
		o.seen = map[string]bool{}
	}
	key := filename
	if abs, err := filepath.EvalSymlinks(filename); err == nil {
		key = abs
	}
	if o.seen[key] {
		return nil, fmt.Errorf("Backing file '%s' creates an infinite loop: %w", filename, ErrCorrupt)
	}
	o.seen[key] = true
	if o.depth > MaxChainDepth {
		return nil, fmt.Errorf("backing chain deeper than %d images: %w", MaxChainDepth, ErrCorrupt)
	}
	f, err := OpenFile(filename, o.ReadOnly, o.Direct)
	if err != nil {
		return nil, err
	}
	var d *Driver
	if o.Format == "" {
		if d, err = ProbeFile(f); err != nil {
			f.Close()
			return nil, err
		}
		o.Probed = true
	} else if d = Lookup(o.Format); d == nil {
		f.Close()
		return nil, fmt.Errorf("Unknown driver '%s'", o.Format)
	}
	if d.ReadOnly && !o.ReadOnly {
		f.Close()
		return nil, fmt.Errorf("Driver '%s' can only be used for read-only devices", d.Name)
	}
	// The locks live as long as f: QEMU's protocol uses OFD locks, which
	// the kernel drops when the driver closes the file.
	access := Access{NoIO: o.NoIO, Write: !o.ReadOnly, Resize: o.Resize,
		Metadata: d.Name != "raw", ForceShare: o.ForceShare}
	if _, err := LockFile(f, access.Perms()); err != nil {
		f.Close()
		return nil, err
	}
	return d.Open(f, &o)
}

// OpenBacking opens the backing image named name (as stored in the image
// header of parent) with format fmt ("" probes). Relative names are
// resolved against the directory of parent. Drivers call it from Open
// unless o.NoBacking.
func OpenBacking(parent, name, format string, o *OpenOptions) (Image, error) {
	bo := *o
	bo.Format = format
	bo.ReadOnly = true
	bo.Probed = false
	bo.depth++
	img, err := Open(BackingPath(parent, name), bo)
	if err != nil {
		return nil, fmt.Errorf("Could not open backing file: %w", err)
	}
	return img, nil
}

// BackingPath resolves a backing file name stored in the image at parent
// as QEMU's path_combine does: absolute names and protocol names stay,
// relative ones are taken relative to parent's directory.
func BackingPath(parent, name string) string {
	if name == "" || filepath.IsAbs(name) || strings.Contains(strings.SplitN(name, "/", 2)[0], ":") {
		return name
	}
	dir := parent[:strings.LastIndexByte(parent, '/')+1]
	return dir + name
}
