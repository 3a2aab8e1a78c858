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
	// RuntimeOptions are the options the driver takes when it opens an
	// image (QEMU's runtime_opts, given with --image-opts, e.g. raw's
	// offset and size), in the order the driver checks them. Open
	// refuses options the list lacks and values of the wrong type; the
	// driver reads them with OpenOptions.RuntimeValues.
	RuntimeOptions []OptionSpec
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
	// NoFlush makes flushes of the host files do nothing, as QEMU's
	// cache=unsafe does (convert's default for its target): metadata
	// updates lose their ordering on disk, which matters only if the
	// machine crashes before the image is closed.
	NoFlush bool
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
	// Runtime holds the format driver's runtime options by name, as the
	// user gave them (--image-opts driver=raw,offset=1M). They apply to
	// the image itself, not to its backing chain.
	Runtime map[string]string
	// NoLock opens the image's host file without QEMU's image locks
	// (the file protocol's locking=off).
	NoLock bool

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
	f, err := o.OpenFile(filename, o.ReadOnly)
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
	// The driver checks the types of its runtime options before it
	// reads the image (qemu_opts_absorb_qdict comes first in QEMU's
	// drivers), so bad values are reported before damaged headers.
	if _, err := o.RuntimeValues(d.RuntimeOptions); err != nil {
		f.Close()
		return nil, err
	}
	if !o.NoLock {
		// The locks live as long as f: QEMU's protocol uses OFD locks,
		// which the kernel drops when the driver closes the file.
		access := Access{NoIO: o.NoIO, Write: !o.ReadOnly, Resize: o.Resize,
			Metadata: d.Name != "raw", ForceShare: o.ForceShare}
		if _, err := LockFile(f, access.Perms()); err != nil {
			f.Close()
			return nil, err
		}
	}
	img, err := d.Open(f, &o)
	if err != nil {
		return nil, err
	}
	// QEMU refuses the options no layer consumed after the image opened
	// (bdrv_open_inherit), so a broken image reports its damage first.
	if name := UnknownOption(d.RuntimeOptions, o.Runtime); name != "" {
		img.Close()
		return nil, fmt.Errorf("Block format '%s' does not support the option '%s'", d.Name, name)
	}
	return img, nil
}

// RuntimeValues returns the runtime options of o that specs (the
// opening driver's RuntimeOptions) list, checked against them; options
// not given read as the specs' defaults. Options specs do not list are
// left to Open, which refuses them once the image is open.
func (o *OpenOptions) RuntimeValues(specs []OptionSpec) (*Options, error) {
	known := map[string]string{}
	for name, v := range o.Runtime {
		if findSpec(specs, name) != nil {
			known[name] = v
		}
	}
	return CheckRuntime(specs, known)
}

// OpenFile opens a host file of the image (the image file, a data file,
// an extent) with the options' cache mode.
func (o *OpenOptions) OpenFile(name string, readOnly bool) (*File, error) {
	f, err := OpenFile(name, readOnly, o.Direct)
	if err == nil && o.NoFlush {
		f.SetNoFlush()
	}
	return f, err
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
	bo.Runtime = nil
	bo.NoLock = false
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
