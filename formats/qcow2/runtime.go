package qcow2

import (
	"math"
	"math/bits"
	"slices"

	"github.com/imgfs/imgfs/formats"
)

// runtimeOptions are qcow2_runtime_opts, the options an image is opened
// with (--image-opts driver=qcow2,lazy-refcounts=on,...), in the order
// qcow2_update_options_prepare reads them, plus the encryption format
// of the "encrypt." group and the external data file. imgfs honours
// lazy-refcounts, pass-discard-request=off and data-file.filename; the
// cache, overlap-check and other discard options tune QEMU's own
// caches, metadata checks and discard passing, which imgfs does its own
// way, and are checked as QEMU checks them.
var runtimeOptions = func() []formats.OptionSpec {
	specs := []formats.OptionSpec{
		{Name: "lazy-refcounts", Type: formats.OptBool, Help: "Postpone refcount updates"},
		{Name: "pass-discard-request", Type: formats.OptBool, Help: "Pass guest discard requests to the layer below"},
		{Name: "pass-discard-snapshot", Type: formats.OptBool, Help: "Generate discard requests when snapshot related space is freed"},
		{Name: "pass-discard-other", Type: formats.OptBool, Help: "Generate discard requests when other clusters are freed"},
		{Name: "overlap-check", Type: formats.OptString, Help: "Selects which overlap checks to perform from a range of templates (none, constant, cached, all)"},
		{Name: "overlap-check.template", Type: formats.OptString, Help: "Selects which overlap checks to perform from a range of templates (none, constant, cached, all)"},
	}
	for _, name := range overlapChecks {
		specs = append(specs, formats.OptionSpec{Name: "overlap-check." + name, Type: formats.OptBool})
	}
	return append(specs,
		formats.OptionSpec{Name: "cache-size", Type: formats.OptSize, Help: "Maximum combined metadata (L2 tables and refcount blocks) cache size"},
		formats.OptionSpec{Name: "l2-cache-size", Type: formats.OptSize, Help: "Maximum L2 table cache size"},
		formats.OptionSpec{Name: "l2-cache-entry-size", Type: formats.OptSize, Help: "Size of each entry in the L2 cache"},
		formats.OptionSpec{Name: "refcount-cache-size", Type: formats.OptSize, Help: "Maximum refcount block cache size"},
		formats.OptionSpec{Name: "cache-clean-interval", Type: formats.OptNumber, Help: "Clean unused cache entries after this time (in seconds)"},
		formats.OptionSpec{Name: "encrypt.format", Type: formats.OptString, Help: "Encryption data format"},
		// The external data file: a node name (which qemu-img never
		// has) or the file's options; imgfs opens it as a file.
		formats.OptionSpec{Name: "data-file", Type: formats.OptString},
		formats.OptionSpec{Name: "data-file.driver", Type: formats.OptString},
		formats.OptionSpec{Name: "data-file.filename", Type: formats.OptString},
	)
}()

// overlapChecks are the metadata kinds QEMU can check writes against,
// each an overlap-check.NAME option.
var overlapChecks = []string{"main-header", "active-l1", "active-l2", "refcount-table",
	"refcount-block", "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory"}

// runtimeSettings are the runtime options imgfs acts on.
type runtimeSettings struct {
	// lazyRefcounts overrides the header's lazy refcounts bit when
	// lazySet.
	lazySet, lazyRefcounts bool
	// dataFile, when not "", is the external data file to use instead
	// of the one the header names.
	dataFile string
	// keepRequestDiscards: pass-discard-request=off, host clusters that
	// discards and zero writes free are not punched in the file.
	keepRequestDiscards bool
}

// passDiscardRequest reports whether host clusters freed by a discard
// or a zero write are deallocated in the file too.
func (rs runtimeSettings) passDiscardRequest() bool { return !rs.keepRequestDiscards }

// parseRuntime checks the runtime options against the image header h as
// qcow2_update_options_prepare does, with its messages, and returns the
// settings imgfs honours.
func parseRuntime(o *formats.OpenOptions, h *Header) (runtimeSettings, error) {
	var rs runtimeSettings
	rt, err := o.RuntimeValues(runtimeOptions)
	if err != nil {
		return rs, err
	}
	if err := checkCacheSizes(rt, h); err != nil {
		return rs, err
	}
	if n, _ := rt.Uint("cache-clean-interval"); n > math.MaxUint32 {
		return rs, errorf(formats.ErrInvalidOption, "Cache clean interval too big")
	}
	rs.keepRequestDiscards = rt.Has("pass-discard-request") && !rt.Bool("pass-discard-request")
	if rt.Has("lazy-refcounts") {
		rs.lazySet, rs.lazyRefcounts = true, rt.Bool("lazy-refcounts")
		if rs.lazyRefcounts && h.Version < 3 {
			return rs, errorf(formats.ErrInvalidOption, "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
		}
	}
	check, hasCheck := rt.String("overlap-check"), rt.Has("overlap-check")
	if template := rt.String("overlap-check.template"); rt.Has("overlap-check.template") {
		if hasCheck && check != template {
			return rs, errorf(formats.ErrInvalidOption, "Conflicting values for qcow2 options 'overlap-check' ('%s') and 'overlap-check.template' ('%s')", check, template)
		}
		check, hasCheck = template, true
	}
	if hasCheck && !slices.Contains([]string{"none", "constant", "cached", "all"}, check) {
		return rs, errorf(formats.ErrInvalidOption, "Unsupported value '%s' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all", check)
	}
	if !o.NoIO {
		// qemu-img info (NoIO) opens no data file, so it ignores these.
		if rt.Has("data-file") {
			name := rt.String("data-file")
			return rs, errorf(formats.ErrInvalidOption, "Cannot find device='%s' nor node-name='%s'", name, name)
		}
		if d := rt.String("data-file.driver"); rt.Has("data-file.driver") && d != "file" {
			return rs, errorf(formats.ErrUnsupported, "imgfs opens data files with the 'file' driver only, not '%s'", d)
		}
		rs.dataFile = rt.String("data-file.filename")
		if rs.dataFile == "" && (rt.Has("data-file.driver") || rt.Has("data-file.filename")) {
			return rs, errorf(formats.ErrInvalidOption, "The 'file' block driver requires a file name")
		}
	}
	if rt.Has("encrypt.format") {
		want := rt.String("encrypt.format")
		switch h.CryptMethod {
		case cryptNone:
			return rs, errorf(formats.ErrInvalidOption, "No encryption in image header, but options specified format '%s'", want)
		case cryptAES:
			if want != "aes" {
				return rs, errorf(formats.ErrInvalidOption, "Header reported 'aes' encryption format but options specify '%s'", want)
			}
		case cryptLUKS:
			if want != "luks" {
				return rs, errorf(formats.ErrInvalidOption, "Header reported 'luks' encryption format but options specify '%s'", want)
			}
		}
	}
	return rs, nil
}

// checkCacheSizes is read_cache_sizes' validation: cache-size splits
// into the L2 and refcount caches, so at most two of the three may be
// given and neither part may exceed the whole; an L2 cache entry is a
// power of two between 512 bytes and the cluster size.
func checkCacheSizes(rt *formats.Options, h *Header) error {
	combined, hasCombined := rt.Uint("cache-size")
	l2, hasL2 := rt.Uint("l2-cache-size")
	refcount, hasRefcount := rt.Uint("refcount-cache-size")
	cluster := h.ClusterSize()
	if hasCombined {
		switch {
		case hasL2 && hasRefcount:
			return errorf(formats.ErrInvalidOption, "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
		case hasL2 && l2 > combined:
			return errorf(formats.ErrInvalidOption, "l2-cache-size may not exceed cache-size")
		case hasRefcount && refcount > combined:
			return errorf(formats.ErrInvalidOption, "refcount-cache-size may not exceed cache-size")
		}
	}
	entry, hasEntry := rt.Uint("l2-cache-entry-size")
	if hasEntry && (entry < 512 || entry > cluster || bits.OnesCount64(entry) != 1) {
		return errorf(formats.ErrInvalidOption, "L2 cache entry size must be a power of two between %d and the cluster size (%d)", 512, cluster)
	}
	return nil
}
