package main

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// Flags shared by the commands that open images. Each command lists the
// ones qemu-img gives it; the names match qemu-img's getopt tables.

// formatFlag is -f; withLong adds --format, which some commands accept.
func formatFlag(name string, withLong bool) cli.Flag {
	f := &cli.StringFlag{Name: name, Usage: "image format"}
	if withLong {
		f.Aliases = []string{"format"}
	}
	return f
}

func objectFlag() cli.Flag {
	// KeepSpace and the app's DisableSliceFlagSeparator keep an object
	// definition ("secret,id=s0,data=x") in one piece.
	return &cli.StringSliceFlag{Name: "object", Usage: "QEMU user creatable object", KeepSpace: true}
}

func imageOptsFlag() cli.Flag {
	return &cli.BoolFlag{Name: "image-opts", Usage: "treat file names as option strings"}
}

func forceShareFlag() cli.Flag {
	return &cli.BoolFlag{Name: "U", Aliases: []string{"force-share"}, Usage: "open images without taking locks"}
}

func outputFlag() cli.Flag {
	return &cli.StringFlag{Name: "output", Usage: "output format (human or json)"}
}

func quietFlag() cli.Flag {
	return &cli.BoolFlag{Name: "q", Usage: "quiet mode"}
}

// cacheFlag is -T (source cache) or -t (target cache).
func cacheFlag(name string) cli.Flag {
	return &cli.StringFlag{Name: name, Usage: "cache mode"}
}

// wantJSON parses --output as qemu-img does: unset means human.
func wantJSON(c *cli.Context) (bool, error) {
	switch o := c.String("output"); {
	case !c.IsSet("output") || o == "human":
		return false, nil
	case o == "json":
		return true, nil
	}
	return false, errors.New("--output must be used with human or json as argument.")
}

// operands returns the command's operands when there are exactly n of
// them; otherwise the usage error msg ("Expecting one image file name").
func operands(c *cli.Context, n int, msg string) ([]string, error) {
	if c.NArg() != n {
		return nil, usageError{msg}
	}
	return c.Args().Slice(), nil
}

// sizeArg parses a numeric option as qemu-img's cvtnum: a byte count
// with an optional k/M/G/T/P/E suffix, at most INT64_MAX. name is how
// the message calls the option ("start offset").
func sizeArg(name, value string) (int64, error) {
	return sizeArgIn(name, value, 0, math.MaxInt64)
}

// sizeArgIn is qemu-img's cvtnum_full: sizeArg with the bounds lo..hi.
func sizeArgIn(name, value string, lo, hi int64) (int64, error) {
	n, err := formats.ParseSize(value)
	if err != nil && !errors.Is(err, formats.ErrSizeRange) {
		return 0, fmt.Errorf("Invalid %s specified. You may use k, M, G, T, P or E suffixes for\n"+
			"%s: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.", name, prog)
	}
	if err != nil || n > uint64(hi) || int64(n) < lo {
		return 0, fmt.Errorf("Invalid %s specified. Must be between %d and %d.", name, lo, hi)
	}
	return int64(n), nil
}

// cacheDirect parses a -t/-T cache mode as bdrv_parse_cache_mode does and
// reports whether it bypasses the host page cache (O_DIRECT).
func cacheDirect(mode string) (direct, ok bool) {
	switch mode {
	case "none", "off", "directsync":
		return true, true
	case "writeback", "unsafe", "writethrough":
		return false, true
	}
	return false, false
}

// opener opens images as qemu-img's img_open does, from the flags shared
// by the commands: -f, --image-opts, -U, -T/-t and --object.
type opener struct {
	imageOpts  bool
	forceShare bool
	direct     bool
	// check opens images for `check`, which repairs them itself.
	check bool
	// noIO opens for metadata only, as info does.
	noIO bool
	// secrets holds the data of --object secret definitions by id.
	secrets map[string][]byte
	// keySecret is the key-secret images are opened with unless
	// --image-opts names one: convert's target gets the one of its -o
	// options, as qemu-img passes creation options on to the open.
	keySecret string
	stderr    io.Writer
}

// newOpener reads the shared flags and creates the --object secrets,
// which qemu-img does while it parses options, before any other check.
func newOpener(c *cli.Context) (*opener, error) {
	o := &opener{
		imageOpts:  c.Bool("image-opts"),
		forceShare: c.Bool("U"),
		stderr:     c.App.ErrWriter,
		secrets:    map[string][]byte{},
	}
	for _, def := range c.StringSlice("object") {
		if err := o.addObject(def); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// setCache applies the cache mode of flag name (-T or -t) when given;
// badMsg is the command's message for an unknown mode.
func (o *opener) setCache(c *cli.Context, name, badMsg string) error {
	if !c.IsSet(name) {
		return nil
	}
	mode := c.String(name)
	direct, ok := cacheDirect(mode)
	if !ok {
		return fmt.Errorf("%s: %s", badMsg, mode)
	}
	o.direct = direct
	return nil
}

// addObject creates one --object definition. Only secrets exist in
// imgfs; they carry the keys of encrypted images.
func (o *opener) addObject(def string) error {
	opts, err := parseKeyValues(def, "qom-type")
	if err != nil {
		return err
	}
	typ := opts.get("qom-type")
	if typ != "secret" {
		return fmt.Errorf("Parameter 'qom-type' does not accept value '%s'", typ)
	}
	id, hasID := opts.lookup("id")
	if !hasID {
		return errors.New("Parameter 'id' is missing")
	}
	if !isIdentifier(id) {
		return errors.New("Parameter 'id' expects an identifier\n" +
			"Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
	}
	for _, kv := range opts {
		switch kv.key {
		case "qom-type", "id", "data", "file", "format", "keyid", "iv":
		default:
			return fmt.Errorf("Parameter '%s' is unexpected", kv.key)
		}
	}
	data, hasData := opts.lookup("data")
	file, hasFile := opts.lookup("file")
	switch {
	case hasData && hasFile:
		return errors.New("'data' and 'file' are mutually exclusive")
	case hasFile:
		b, err := os.ReadFile(file)
		if err != nil {
			return fmt.Errorf("Unable to read %s: Failed to open file “%s”: %v", file, file, formats.ErrnoError{Err: errors.Unwrap(err)})
		}
		data = string(b)
	case !hasData:
		return errors.New("Either 'file' or 'data' must be provided")
	}
	switch opts.get("format") {
	case "", "raw":
		o.secrets[id] = []byte(data)
	case "base64":
		b, err := decodeBase64(data)
		if err != nil {
			return err
		}
		o.secrets[id] = b
	default:
		return fmt.Errorf("Parameter 'format' does not accept value '%s'", opts.get("format"))
	}
	return nil
}

// decodeBase64 decodes like QEMU's qbase64_decode: it refuses characters
// outside the base64 alphabet but, like g_base64_decode, forgives missing
// padding and a dangling last character.
func decodeBase64(s string) ([]byte, error) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '/' || c == '=') {
			return nil, errors.New("Base64 data contains invalid characters")
		}
	}
	s = strings.TrimRight(s, "=")
	if len(s)%4 == 1 {
		s = s[:len(s)-1] // six bits make no byte
	}
	b, err := base64.RawStdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("Base64 data is invalid: %v", err)
	}
	return b, nil
}

// isIdentifier is QEMU's id_wellformed: a letter, then letters, digits,
// '-', '.', '_'.
func isIdentifier(s string) bool {
	if s == "" || !(s[0] >= 'a' && s[0] <= 'z' || s[0] >= 'A' && s[0] <= 'Z') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

// keyValue is one "key=value" of a QemuOpts string.
type keyValue struct{ key, value string }

type keyValues []keyValue

func (kvs keyValues) lookup(key string) (string, bool) {
	v, ok := "", false
	for _, kv := range kvs {
		if kv.key == key {
			v, ok = kv.value, true // the last one wins, as in QemuOpts
		}
	}
	return v, ok
}

func (kvs keyValues) get(key string) string { v, _ := kvs.lookup(key); return v }

// parseKeyValues splits a QemuOpts string: ",," is a literal comma, a
// leading bare value is the implied option, a later bare key means
// key=on.
func parseKeyValues(s, implied string) (keyValues, error) {
	var out keyValues
	var cur strings.Builder
	var items []string
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			items = append(items, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	items = append(items, cur.String())
	for i, item := range items {
		key, value, hasValue := strings.Cut(item, "=")
		switch {
		case i == 0 && !hasValue && implied != "":
			key, value = implied, item
		case !hasValue:
			value = "on"
		}
		if key == "" {
			return nil, fmt.Errorf("Invalid parameter '%s'", item)
		}
		out = append(out, keyValue{key, value})
	}
	return out, nil
}

// open opens filename (or, with --image-opts, the image an option string
// describes) as img_open does. format is -f ("" probes). Errors read
// "Could not open 'NAME': reason".
func (o *opener) open(filename, format string, readOnly, noBacking bool) (formats.Image, error) {
	name, oo := filename, formats.OpenOptions{
		Format:     format,
		ReadOnly:   readOnly,
		NoBacking:  noBacking,
		ForceShare: o.forceShare,
		Direct:     o.direct,
		Check:      o.check,
		NoIO:       o.noIO,
		Secrets:    o.secrets,
		KeySecret:  o.keySecret,
		// Drivers' warnings (raw's about a guessed format) are whole
		// lines without the newline.
		Warn: func(msg string) { fmt.Fprintln(o.stderr, msg) },
	}
	if o.imageOpts {
		if format != "" {
			return nil, errors.New("--image-opts and --format are mutually exclusive")
		}
		var err error
		if name, err = o.applyImageOpts(filename, &oo); errors.Is(err, errForceShareConflict) {
			return nil, err // qemu-img checks this before it tries to open
		} else if err != nil {
			return nil, fmt.Errorf("Could not open '%s': %w", filename, err)
		}
	}
	if oo.ForceShare && !oo.ReadOnly {
		// bdrv_open_common refuses this before it opens anything.
		return nil, fmt.Errorf("Could not open '%s': force-share=on can only be used with read-only images", filename)
	}
	img, err := formats.Open(name, oo)
	if err != nil {
		return nil, fmt.Errorf("Could not open '%s': %w", filename, err)
	}
	return img, nil
}

// imageOptsName is the json: name QEMU's bdrv_refresh_filename gives an
// image opened with --image-opts whose options say more than its driver
// and file name (a LUKS key-secret, say): driver, file and those options
// as compact JSON. It is "" when the file name alone describes the image.
// The runtime flags force-share, read-only and cache.direct are not part
// of a name.
func imageOptsName(optstr string) string {
	kvs, err := parseKeyValues(optstr, "file")
	if err != nil {
		return ""
	}
	driver, file := "", formats.Object{{Key: "driver", Value: "file"}}
	var extra formats.Object
	for _, kv := range kvs {
		switch kv.key {
		case "driver":
			driver = kv.value
		case "file.driver":
			file[0].Value = kv.value
		case "file.filename":
			file = append(file, formats.Member{Key: "filename", Value: kv.value})
		case "force-share", "read-only", "cache.direct":
		default:
			extra = append(extra, formats.Member{Key: kv.key, Value: kv.value})
		}
	}
	if len(extra) == 0 {
		return ""
	}
	obj := append(formats.Object{{Key: "driver", Value: driver}, {Key: "file", Value: file}}, extra...)
	return "json:" + control.MarshalQJSONCompact(obj)
}

var errForceShareConflict = errors.New("--force-share/-U conflicts with image options")

// applyImageOpts reads an --image-opts string (driver=qcow2,
// file.filename=NAME, ...) into oo and returns the host file name.
func (o *opener) applyImageOpts(optstr string, oo *formats.OpenOptions) (string, error) {
	kvs, err := parseKeyValues(optstr, "file")
	if err != nil {
		return "", err
	}
	var filename string
	qcowKey := false // the secret came as qcow2's encrypt.key-secret
	for _, kv := range kvs {
		switch kv.key {
		case "driver":
			if formats.Lookup(kv.value) == nil {
				return "", fmt.Errorf("Unknown driver '%s'", kv.value)
			}
			oo.Format = kv.value
		case "file.filename":
			filename = kv.value
		case "file.driver":
			if kv.value != "file" {
				return "", fmt.Errorf("Unknown protocol '%s'", kv.value)
			}
		case "file":
			// A plain "file=NAME" names an existing block node, which
			// qemu-img never has.
			return "", fmt.Errorf("Cannot find device='%s' nor node-name='%s'", kv.value, kv.value)
		case "force-share":
			share, err := formats.ParseBool(kv.value)
			if err != nil {
				return "", fmt.Errorf("Parameter 'force-share' expects 'on' or 'off'")
			}
			if o.forceShare && !share {
				return "", errForceShareConflict
			}
			oo.ForceShare = share
		case "read-only":
			ro, err := formats.ParseBool(kv.value)
			if err != nil {
				return "", fmt.Errorf("Parameter 'read-only' expects 'on' or 'off'")
			}
			oo.ReadOnly = oo.ReadOnly || ro
		case "key-secret":
			// Checked against the driver below: driver= may come later.
			oo.KeySecret = kv.value
		case "encrypt.key-secret":
			// qcow2's name for the same secret; also checked below.
			oo.KeySecret = kv.value
			qcowKey = true
		case "cache.direct":
			direct, err := formats.ParseBool(kv.value)
			if err != nil {
				return "", fmt.Errorf("Parameter 'cache.direct' expects 'on' or 'off'")
			}
			oo.Direct = direct
		default:
			if strings.HasPrefix(kv.key, "file.") {
				return "", fmt.Errorf("Block protocol 'file' doesn't support the option '%s'", strings.TrimPrefix(kv.key, "file."))
			}
			if oo.Format == "" {
				return "", errors.New("Must specify either driver or file")
			}
			return "", fmt.Errorf("Block format '%s' does not support the option '%s'", oo.Format, kv.key)
		}
	}
	if qcowKey && oo.Format != "" && oo.Format != "qcow2" {
		return "", fmt.Errorf("Block format '%s' does not support the option 'encrypt.key-secret'", oo.Format)
	}
	if !qcowKey && oo.KeySecret != "" && oo.Format != "" && oo.Format != "luks" {
		// Without driver= the probed driver takes it, as in QEMU.
		return "", fmt.Errorf("Block format '%s' does not support the option 'key-secret'", oo.Format)
	}
	switch {
	case filename != "":
		return filename, nil
	case oo.Format == "":
		return "", errors.New("Must specify either driver or file")
	}
	return "", errors.New(`A block device must be specified for "file"`)
}
