package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/qcow"
)

// createOptions are qcow2's -o options in QEMU 7.2's table order (the
// order of create's "Formatting" line); the file protocol's nocow and
// extent_size_hint follow through Driver.CreateSpecs.
var createOptions = []formats.OptionSpec{
	{Name: "encryption", Type: formats.OptBool, Help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
	{Name: "encrypt.format", Type: formats.OptString, Help: "Encrypt the image, format choices: 'aes', 'luks'"},
	{Name: "encrypt.key-secret", Type: formats.OptString, Help: "ID of secret providing qcow AES key or LUKS passphrase"},
	{Name: "encrypt.cipher-alg", Type: formats.OptString, Help: "Name of encryption cipher algorithm"},
	{Name: "encrypt.cipher-mode", Type: formats.OptString, Help: "Name of encryption cipher mode"},
	{Name: "encrypt.ivgen-alg", Type: formats.OptString, Help: "Name of IV generator algorithm"},
	{Name: "encrypt.ivgen-hash-alg", Type: formats.OptString, Help: "Name of IV generator hash algorithm"},
	{Name: "encrypt.hash-alg", Type: formats.OptString, Help: "Name of encryption hash algorithm"},
	{Name: "encrypt.iter-time", Type: formats.OptNumber, Help: "Time to spend in PBKDF in milliseconds"},
	{Name: "cluster_size", Type: formats.OptSize, Help: "qcow2 cluster size", Default: "65536"},
	{Name: "extended_l2", Type: formats.OptBool, Help: "Extended L2 tables", Default: "off"},
	{Name: "preallocation", Type: formats.OptString, Help: "Preallocation mode (allowed values: off, metadata, falloc, full)"},
	{Name: "compression_type", Type: formats.OptString, Help: "Compression method used for image cluster compression", Default: "zlib"},
	{Name: "size", Type: formats.OptSize, Help: "Virtual disk size"},
	{Name: "compat", Type: formats.OptString, Help: "Compatibility level (v2 [0.10] or v3 [1.1])"},
	{Name: "backing_file", Type: formats.OptString, Help: "File name of a base image"},
	{Name: "backing_fmt", Type: formats.OptString, Help: "Image format of the base image"},
	{Name: "data_file", Type: formats.OptString, Help: "File name of an external data file"},
	{Name: "data_file_raw", Type: formats.OptBool, Help: "The external data file must stay valid as a raw image"},
	{Name: "lazy_refcounts", Type: formats.OptBool, Help: "Postpone refcount updates", Default: "off"},
	{Name: "refcount_bits", Type: formats.OptNumber, Help: "Width of a reference count entry in bits", Default: "16"},
}

// createParams are validated creation options.
type createParams struct {
	version       uint32
	size          int64
	clusterBits   uint32
	extendedL2    bool
	prealloc      string
	compression   uint8
	lazyRefcounts bool
	refcountOrder uint32
	backingFile   string
	backingFmt    string
	dataFile      string
	dataFileRaw   bool
	crypt         *cryptParams // nil: not encrypted
}

// parseCreateOptions checks the options in the order QEMU 7.2 does (the
// QAPI enums first, then qcow2_co_create's checks) with its messages.
func parseCreateOptions(o *formats.Options) (*createParams, error) {
	bad := func(format string, args ...any) error {
		return errorf(formats.ErrInvalidOption, format, args...)
	}
	// QEMU renames the legacy encryption option before it parses any.
	if err := qcow.CheckEncryptAlias(o); err != nil {
		return nil, err
	}
	p := &createParams{version: 3}
	switch v := o.String("compat"); v {
	case "", "1.1", "v3":
	case "0.10", "v2":
		p.version = 2
	default:
		return nil, bad("Parameter 'version' does not accept value '%s'", v)
	}
	cryptFormat, err := checkCryptFormat(o)
	if err != nil {
		return nil, err
	}
	switch v := o.String("preallocation"); v {
	case "", "off":
		p.prealloc = "off"
	case "metadata", "falloc", "full":
		p.prealloc = v
	default:
		return nil, bad("Parameter 'preallocation' does not accept value '%s'", v)
	}
	switch v := o.String("compression_type"); v {
	case "", "zlib":
	case "zstd":
		p.compression = CompressionZstd
	default:
		return nil, bad("Parameter 'compression-type' does not accept value '%s'", v)
	}
	size, ok := o.Uint("size")
	if !ok {
		return nil, bad("Image creation needs a size parameter")
	}
	if size > 1<<63-512 {
		return nil, bad("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
	}
	p.size = int64(size+511) &^ 511
	cs, _ := o.Uint("cluster_size")
	p.extendedL2 = o.Bool("extended_l2")
	if p.extendedL2 && p.version < 3 {
		return nil, bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return nil, bad("Cluster size must be a power of two between %d and %dk", 1<<minClusterBits, 1<<maxClusterBits>>10)
	}
	p.clusterBits = uint32(bits.TrailingZeros64(cs))
	if p.extendedL2 && p.clusterBits < minClusterBitsExtL2 {
		return nil, bad("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 1<<minClusterBitsExtL2)
	}
	p.backingFile = o.String("backing_file")
	p.backingFmt = o.String("backing_fmt")
	if p.backingFile != "" && p.prealloc != "off" && !p.extendedL2 {
		return nil, bad("Backing file and preallocation can only be used at the same time if extended_l2 is on")
	}
	if p.backingFmt != "" && p.backingFile == "" {
		return nil, bad("Backing format cannot be used without backing file")
	}
	p.lazyRefcounts = o.Bool("lazy_refcounts")
	if p.version < 3 && p.lazyRefcounts {
		return nil, bad("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	rb, _ := o.Uint("refcount_bits")
	if rb == 0 || rb > 64 || rb&(rb-1) != 0 {
		return nil, bad("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if p.version < 3 && rb != 16 {
		return nil, bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
	}
	p.refcountOrder = uint32(bits.TrailingZeros64(rb))
	p.dataFile = o.String("data_file")
	p.dataFileRaw = o.Bool("data_file_raw")
	if p.dataFileRaw && p.dataFile == "" {
		return nil, bad("data-file-raw requires data-file")
	}
	if p.dataFileRaw && p.prealloc == "off" {
		// A raw data file must map every cluster 1:1 from the start.
		p.prealloc = "metadata"
	}
	if p.dataFileRaw && p.backingFile != "" {
		return nil, bad("Backing file and data-file-raw cannot be used at the same time")
	}
	if p.dataFile != "" && p.version < 3 {
		return nil, bad("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	if p.compression != CompressionZlib && p.version < 3 {
		return nil, bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	if len(p.backingFile) > maxBackingNameLen {
		return nil, bad("Could not assign backing file '%s' with format '%s': Invalid argument", p.backingFile, p.backingFmt)
	}
	lay := Layout{ClusterBits: p.clusterBits, ClusterSize: 1 << p.clusterBits, L2Bits: p.clusterBits - 3}
	if p.extendedL2 {
		lay.L2Bits--
	}
	if lay.L1SizeFor(p.size) > maxL1Bytes/8 {
		return nil, bad("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
	}
	// QEMU sets up encryption last, so its errors come last.
	crypt, err := parseCryptOptions(o, cryptFormat)
	if err != nil {
		return nil, err
	}
	p.crypt = crypt
	return p, nil
}

// create is Driver.Create. It builds the image as qcow2_co_create does:
// a header, a one-cluster refcount table at cluster 1 and a refcount
// block at cluster 2, then opens it, takes the references for those
// three clusters, rewrites the full header, grows it to its size (with
// preallocation) and records the backing file. The options nocow and
// extent_size_hint are accepted without effect. Like QEMU, a failed
// creation removes the files.
func create(filename string, o *formats.Options) error {
	p, err := parseCreateOptions(o)
	if err != nil {
		return err
	}
	err = createFiles(filename, p)
	if err != nil {
		os.Remove(filename)
		if p.dataFile != "" {
			os.Remove(p.dataFile)
		}
	}
	return err
}

func createFiles(filename string, p *createParams) error {
	f, err := formats.CreateFile(filename)
	if err != nil {
		return err
	}
	// As qcow2_co_create, which opens the new image BDRV_O_NO_FLUSH: a
	// half-made image is of no use after a crash anyway.
	f.SetNoFlush()
	if p.dataFile != "" {
		d, err := formats.CreateFile(p.dataFile)
		if err != nil {
			f.Close()
			return err
		}
		if err := d.Close(); err != nil {
			f.Close()
			return err
		}
	}
	if err := writeInitialLayout(f, p); err != nil {
		f.Close()
		return err
	}
	img, err := openImage(f, &formats.OpenOptions{NoBacking: true, NoFlush: true})
	if err != nil {
		f.Close()
		return err
	}
	if err := img.finishCreate(p); err != nil {
		img.Close()
		return err
	}
	return img.Close()
}

// writeInitialLayout writes the minimal image: header, refcount table
// pointing at an empty refcount block, size 0 and no L1 table.
func writeInitialLayout(f *formats.File, p *createParams) error {
	h := &Header{
		Version:               p.version,
		ClusterBits:           p.clusterBits,
		RefcountTableOffset:   1 << p.clusterBits,
		RefcountTableClusters: 1,
		RefcountOrder:         p.refcountOrder,
		HeaderLength:          headerV2Len,
		CompressionType:       p.compression,
	}
	if p.version >= 3 {
		h.HeaderLength = headerV3Len
		if p.lazyRefcounts {
			h.CompatibleFeatures |= CompatLazyRefcounts
		}
		if p.dataFile != "" {
			h.IncompatibleFeatures |= IncompatDataFile
			h.HasDataFileExt = true
			h.DataFile = p.dataFile
		}
		if p.dataFileRaw {
			h.AutoclearFeatures |= AutoclearDataFileRaw
		}
		if p.compression != CompressionZlib {
			h.IncompatibleFeatures |= IncompatCompressionType
		}
		if p.extendedL2 {
			h.IncompatibleFeatures |= IncompatExtendedL2
		}
	}
	buf, err := h.Encode()
	if err != nil {
		return err
	}
	cs := int64(1) << p.clusterBits
	tables := make([]byte, 2*cs)
	binary.BigEndian.PutUint64(tables, uint64(2*cs))
	buf = append(buf, tables...)
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("Could not write qcow2 header: %w", formats.ErrnoError{Err: err})
	}
	return nil
}

// finishCreate makes the minimal image consistent and complete.
func (img *Image) finishCreate(p *createParams) error {
	img.mu.Lock()
	err := img.beforeMetadataWrite()
	if err == nil {
		err = img.updateRefcounts(0, 3, 1)
	}
	img.freeHint = 3
	if err == nil {
		err = img.writeHeader()
	}
	img.mu.Unlock()
	if err != nil {
		return fmt.Errorf("Could not allocate clusters for qcow2 header and refcount table: %w", err)
	}
	if err := img.Resize(p.size, p.prealloc, false); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	if p.backingFile != "" {
		img.mu.Lock()
		img.hdr.BackingFile, img.hdr.BackingFormat = p.backingFile, p.backingFmt
		err := img.writeHeader()
		img.mu.Unlock()
		if err != nil {
			return fmt.Errorf("Could not assign backing file '%s' with format '%s': %w", p.backingFile, p.backingFmt, err)
		}
	}
	if p.crypt != nil {
		return img.setUpEncryption(p.crypt)
	}
	return nil
}
