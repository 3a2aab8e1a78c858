package vmdk

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"

	"github.com/imgfs/imgfs/formats"
	"golang.org/x/sys/unix"
)

// createOptions is vmdk_create_opts, in QEMU's table order (the
// "Formatting" line follows it).
var createOptions = []formats.OptionSpec{
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "adapter_type", Type: formats.OptString, Help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"},
	{Name: "backing_file", Type: formats.OptString, Help: "File name of a base image"},
	{Name: "backing_fmt", Type: formats.OptString, Help: "Must be 'vmdk' if present"},
	{Name: "compat6", Type: formats.OptBool, Help: "VMDK version 6 image", Default: "off"},
	{Name: "hwversion", Type: formats.OptString, Help: "VMDK hardware version", Default: "undefined"},
	{Name: "toolsversion", Type: formats.OptString, Help: "VMware guest tools version"},
	{Name: "subformat", Type: formats.OptString, Help: "VMDK flat extent format, can be one of " +
		"{monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "},
	{Name: "zeroed_grain", Type: formats.OptBool, Help: "Enable efficient zero writes using the zeroed-grain GTE feature"},
}

// adapterTypes are BlockdevVmdkAdapterType's values.
var adapterTypes = map[string]bool{"ide": true, "buslogic": true, "lsilogic": true, "legacyESX": true}

// subformats are BlockdevVmdkSubformat's values.
var subformats = map[string]bool{
	"monolithicSparse": true, "monolithicFlat": true, "twoGbMaxExtentSparse": true,
	"twoGbMaxExtentFlat": true, "streamOptimized": true,
}

// splitSize is the extent size of the twoGbMaxExtent subformats.
const splitSize = 0x80000000

// protocolOptions are the file protocol's options QEMU passes on when it
// creates each file of the image.
var protocolOptions = []string{"nocow", "preallocation", "extent_size_hint"}

// create is vmdk_co_create_opts and vmdk_co_do_create: check the
// options in QEMU's order, create the descriptor file (or the single
// sparse file), read the parent's CID, create the extents, then write
// the descriptor.
func create(filename string, opts *formats.Options) error {
	if opts.Has("backing_fmt") && opts.String("backing_fmt") != "vmdk" {
		return formats.Errorf(formats.ErrInvalidOption, "backing_file must be a vmdk image")
	}
	if filename == "" {
		return formats.Errorf(formats.ErrInvalidOption, "No filename provided")
	}
	sizeOpt, _ := opts.Uint("size")
	size := int64((sizeOpt + sectorSize - 1) &^ (sectorSize - 1))
	adapter := "ide"
	if opts.Has("adapter_type") {
		adapter = opts.String("adapter_type")
	}
	backing := opts.String("backing_file")
	hwVersion := opts.String("hwversion")
	toolsVersion := opts.String("toolsversion")
	compat6 := opts.Bool("compat6")
	sub := "monolithicSparse"
	if opts.Has("subformat") {
		sub = opts.String("subformat")
	}
	zeroedGrain := opts.Bool("zeroed_grain")
	if !adapterTypes[adapter] {
		return formats.Errorf(formats.ErrInvalidOption, "invalid parameter value: %s", adapter)
	}
	if !subformats[sub] {
		return formats.Errorf(formats.ErrInvalidOption, "invalid parameter value: %s", sub)
	}
	if compat6 {
		if hwVersion != "undefined" {
			return formats.Errorf(formats.ErrInvalidOption, "compat6 cannot be enabled with hwversion set")
		}
		hwVersion = "6"
	}
	if hwVersion == "undefined" {
		hwVersion = "4"
	}
	if !opts.Has("toolsversion") {
		toolsVersion = "2147483647"
	}
	heads := 16
	if adapter != "ide" {
		// VMware's geometry for SCSI adapters.
		heads = 255
	}
	split := sub == "twoGbMaxExtentFlat" || sub == "twoGbMaxExtentSparse"
	flat := sub == "monolithicFlat" || sub == "twoGbMaxExtentFlat"
	compressed := sub == "streamOptimized"
	if flat && backing != "" {
		return formats.Errorf(formats.ErrUnsupported, "Flat image can't have backing file")
	}
	if flat && zeroedGrain {
		return formats.Errorf(formats.ErrUnsupported, "Flat image can't enable zeroed grain")
	}

	dir, base := filepath.Split(filename)
	prefix, postfix := base, ""
	if i := strings.LastIndexByte(base, '.'); i >= 0 {
		prefix, postfix = base[:i], base[i:]
	}
	c := &creator{opts: opts, flat: flat, compressed: compressed, zeroedGrain: zeroedGrain}

	var lines strings.Builder
	lineFor := func(sectors int64, name string) {
		if flat {
			fmt.Fprintf(&lines, "RW %d FLAT \"%s\" 0\n", sectors, filepath.Base(name))
		} else {
			fmt.Fprintf(&lines, "RW %d SPARSE \"%s\"\n", sectors, filepath.Base(name))
		}
	}
	monolithic := !split && !flat
	mainSize := int64(0)
	if monolithic {
		mainSize = size
	}
	main, err := c.extent(filename, mainSize, !flat && monolithic)
	if err != nil {
		return err
	}
	defer main.Close()
	if monolithic {
		lineFor((size+sectorSize-1)/sectorSize, filename)
	}

	parentCID := uint32(0xffffffff)
	parentLine := ""
	if backing != "" {
		if parentCID, err = readParentCID(filename, backing); err != nil {
			return err
		}
		parentLine = fmt.Sprintf("parentFileNameHint=\"%s\"\n", backing)
	}

	extentSize := size
	if split {
		extentSize = splitSize
	}
	created := mainSize
	for idx := 1; created < size; idx++ {
		cur := min(size-created, extentSize)
		var name string
		switch {
		case split && flat:
			name = fmt.Sprintf("%s%s-f%03d%s", dir, prefix, idx, postfix)
		case split:
			name = fmt.Sprintf("%s%s-s%03d%s", dir, prefix, idx, postfix)
		default:
			name = fmt.Sprintf("%s%s-flat%s", dir, prefix, postfix)
		}
		f, err := c.extent(name, cur, !flat)
		if err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		lineFor((cur+sectorSize-1)/sectorSize, name)
		created += cur
	}

	desc := fmt.Sprintf("# Disk DescriptorFile\n"+
		"version=1\n"+
		"CID=%x\n"+
		"parentCID=%x\n"+
		"createType=\"%s\"\n"+
		"%s"+
		"\n"+
		"# Extent description\n"+
		"%s"+
		"\n"+
		"# The Disk Data Base\n"+
		"#DDB\n"+
		"\n"+
		"ddb.virtualHWVersion = \"%s\"\n"+
		"ddb.geometry.cylinders = \"%d\"\n"+
		"ddb.geometry.heads = \"%d\"\n"+
		"ddb.geometry.sectors = \"63\"\n"+
		"ddb.adapterType = \"%s\"\n"+
		"ddb.toolsVersion = \"%s\"\n",
		rand.Uint32(), parentCID, sub, parentLine, lines.String(), hwVersion,
		size/int64(63*heads*sectorSize), heads, adapter, toolsVersion)
	if monolithic {
		if _, err := main.WriteAt([]byte(desc), 0x200); err != nil {
			return fmt.Errorf("Could not write description: %w", err)
		}
	} else {
		if _, err := main.WriteAt([]byte(desc), 0); err != nil {
			return fmt.Errorf("Could not write description: %w", err)
		}
		if err := main.Truncate(int64(len(desc))); err != nil {
			return fmt.Errorf("Could not resize file: %w", formats.ErrnoError{Err: err})
		}
	}
	return main.Close()
}

// creator makes the files of a new image.
type creator struct {
	opts                          *formats.Options
	flat, compressed, zeroedGrain bool
}

// extent creates one file as vmdk_create_extent does: the file protocol
// creates it empty (with the user's nocow, preallocation and
// extent_size_hint), then it becomes a flat extent of size bytes or,
// when sparse, a sparse extent with its header and grain directories.
// It returns the open file.
func (c *creator) extent(name string, size int64, sparse bool) (*formats.File, error) {
	raw := formats.Lookup("raw")
	if raw == nil {
		return nil, fmt.Errorf("creating %s: the raw driver, which creates files, is not registered: %w", name, formats.ErrUnsupported)
	}
	po := formats.NewOptions(raw.CreateSpecs())
	for _, k := range protocolOptions {
		if c.opts.Has(k) {
			if err := po.Set(k, c.opts.String(k)); err != nil {
				return nil, err
			}
		}
	}
	if err := raw.Create(name, po); err != nil {
		return nil, err
	}
	if !sparse {
		if size > 0 {
			// Growing through the raw driver writes the first block as
			// QEMU's truncate does, so the files map alike.
			img, err := formats.Open(name, formats.OpenOptions{Format: "raw", Resize: true})
			if err != nil {
				return nil, err
			}
			r, ok := img.(formats.Resizer)
			if !ok {
				img.Close()
				return nil, fmt.Errorf("raw images cannot be resized: %w", formats.ErrUnsupported)
			}
			err = r.Resize(size, "off", false)
			if cerr := img.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return nil, err
			}
		}
		return formats.OpenFile(name, false, false)
	}
	f, err := formats.OpenFile(name, false, false)
	if err != nil {
		return nil, err
	}
	if err := c.initSparse(f, size); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// initSparse writes a new sparse extent of size bytes (vmdk_init_extent):
// header, then space up to the first grain, with the redundant grain
// directory and its tables first and the grain directory and its tables
// after. QEMU computes the layout in 32 bits; so do we.
func (c *creator) initSparse(f *formats.File, size int64) error {
	h := header4{Version: 1, Flags: flagRGD | flagNLDetect, Capacity: uint64(size / sectorSize),
		Granularity: 128, NumGTEsPerGT: 512, DescOffset: 1, DescSize: 20, CheckBytes: checkBytes}
	switch {
	case c.compressed:
		h.Version = 3
		h.Flags |= flagCompress | flagMarker
		h.CompressAlgo = compressionDeflate
	case c.zeroedGrain:
		h.Version = 2
	}
	if c.zeroedGrain {
		h.Flags |= flagZeroGrain
	}
	grains := uint32((h.Capacity + h.Granularity - 1) / h.Granularity)
	gtSize := uint32((h.NumGTEsPerGT*4 + sectorSize - 1) / sectorSize)
	gtCount := (grains + h.NumGTEsPerGT - 1) / h.NumGTEsPerGT
	gdSectors := (gtCount*4 + sectorSize - 1) / sectorSize
	h.RGDOffset = h.DescOffset + h.DescSize
	h.GDOffset = h.RGDOffset + uint64(gdSectors) + uint64(gtSize*gtCount)
	end := h.GDOffset + uint64(gdSectors) + uint64(gtSize*gtCount)
	h.GrainOffset = (end + h.Granularity - 1) / h.Granularity * h.Granularity
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return fmt.Errorf("Input/output error: %w", err)
	}
	if err := f.Truncate(int64(h.GrainOffset << 9)); err != nil {
		return fmt.Errorf("Could not resize file: %w", formats.ErrnoError{Err: err})
	}
	gd := make([]byte, gdSectors*sectorSize)
	for _, dirAt := range []uint64{h.RGDOffset, h.GDOffset} {
		t := uint32(dirAt) + gdSectors
		for i := uint32(0); i < gtCount; i++ {
			putLE32(gd[4*i:], t)
			t += gtSize
		}
		if _, err := f.WriteAt(gd, int64(dirAt)*sectorSize); err != nil {
			return fmt.Errorf("Input/output error: %w", err)
		}
	}
	return nil
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// readParentCID opens the backing file named for a new image (relative
// to it) without its own backing chain, checks that it is a VMDK image
// and returns its CID.
func readParentCID(filename, backing string) (uint32, error) {
	img, err := formats.Open(formats.BackingPath(filename, backing), formats.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return 0, err
	}
	defer img.Close()
	p, ok := img.(*Image)
	if !ok {
		return 0, formats.Errorf(formats.ErrInvalidOption, "Invalid backing file format: %s. Must be vmdk", img.Format())
	}
	return p.cid, nil
}

// errPerm is what qemu-img shows for VMDK_ERROR (-1) as an errno.
var errPerm = formats.ErrnoError{Err: unix.EPERM}
