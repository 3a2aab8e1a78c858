package main

import (
	"encoding/base64"
	"encoding/json"
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
	// noFlush: cache=unsafe, flushes do nothing.
	noFlush bool
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

// keyValue is one "key=value" of a QemuOpts string, or one member of a
// json: file name's object, whose JSON value (typed) its name shows. A
// null member (null) names the key but sets nothing.
type keyValue struct {
	key, value   string
	typed        any
	isJSON, null bool
}

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

// last is the last keyValue of key (the zero one when there is none).
func (kvs keyValues) last(key string) keyValue {
	var out keyValue
	for _, kv := range kvs {
		if kv.key == key {
			out = kv
		}
	}
	return out
}

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
		out = append(out, keyValue{key: key, value: value})
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
		NoFlush:    o.noFlush,
		Check:      o.check,
		NoIO:       o.noIO,
		Secrets:    o.secrets,
		KeySecret:  o.keySecret,
		// Drivers' warnings (raw's about a guessed format) are whole
		// lines without the newline.
		Warn: func(msg string) { fmt.Fprintln(o.stderr, msg) },
	}
	kvs, err := o.imageOptions(filename, format)
	if err != nil {
		if errors.Is(err, errFormatConflict) {
			return nil, err
		}
		return nil, fmt.Errorf("Could not open '%s': %w", filename, err)
	}
	if kvs != nil {
		var lateErr error
		if name, lateErr, err = o.applyImageOpts(kvs, &oo); errors.Is(err, errForceShareConflict) {
			return nil, err // qemu-img checks this before it tries to open
		} else if err != nil {
			return nil, fmt.Errorf("Could not open '%s': %w", filename, err)
		}
		if lateErr != nil {
			// QEMU finds these only once the file is open, so a file
			// that cannot be opened is reported instead.
			f, err := formats.OpenFile(name, oo.ReadOnly, oo.Direct)
			if err == nil {
				f.Close()
				err = lateErr
			}
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

var errFormatConflict = errors.New("--image-opts and --format are mutually exclusive")

// imageOptions returns the options filename gives: with --image-opts it
// is an option string, and a "json:{...}" name is a JSON object of them
// (format, the -f option, then overrides its driver). It returns nil for
// a plain file name.
func (o *opener) imageOptions(filename, format string) (keyValues, error) {
	switch {
	case o.imageOpts && format != "":
		return nil, errFormatConflict
	case o.imageOpts:
		return parseKeyValues(filename, "file")
	case strings.HasPrefix(filename, "json:"):
		kvs, err := jsonOptions(strings.TrimPrefix(filename, "json:"))
		if err == nil && format != "" {
			kvs = append(kvs, keyValue{key: "driver", value: format})
		}
		return kvs, err
	}
	return nil, nil
}

// jsonOptions reads the object of a json: file name as QEMU's
// qdict_flatten and qemu_opts_absorb_qdict see it: nested objects and
// arrays become dotted keys (file.filename, x.0), numbers keep their
// text, booleans read on/off, and null members set nothing.
func jsonOptions(text string) (keyValues, error) {
	dec := json.NewDecoder(strings.NewReader(text))
	dec.UseNumber()
	tok, err := dec.Token()
	switch {
	case err == io.EOF:
		return nil, errors.New("Could not parse the JSON options: Expecting a JSON value")
	case err != nil:
		return nil, fmt.Errorf("Could not parse the JSON options: JSON parse error, %v", err)
	case tok != json.Delim('{'):
		return nil, errors.New("Invalid JSON object given")
	}
	kvs := keyValues{} // not nil: the name has options, if none
	if err := flattenJSON(dec, "", &kvs); err != nil {
		return nil, fmt.Errorf("Could not parse the JSON options: JSON parse error, %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("Could not parse the JSON options: Expecting at most one JSON value")
	}
	return kvs, nil
}

// flattenJSON reads the members of an object whose '{' dec has read,
// up to its '}', into kvs with prefix before their keys.
func flattenJSON(dec *json.Decoder, prefix string, kvs *keyValues) error {
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key := tok.(string) // the decoder only yields strings as keys
		if seen[key] {
			return errors.New("duplicate key")
		}
		seen[key] = true
		if err := flattenValue(dec, prefix+key, kvs); err != nil {
			return err
		}
	}
	_, err := dec.Token() // '}'
	return err
}

// flattenValue reads one JSON value for key.
func flattenValue(dec *json.Decoder, key string, kvs *keyValues) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return flattenJSON(dec, key+".", kvs)
		}
		for i := 0; dec.More(); i++ { // '['
			if err := flattenValue(dec, fmt.Sprintf("%s.%d", key, i), kvs); err != nil {
				return err
			}
		}
		_, err := dec.Token() // ']'
		return err
	case string:
		*kvs = append(*kvs, keyValue{key: key, value: v, typed: v, isJSON: true})
	case json.Number:
		// The name shows the number as QEMU prints it: a whole number
		// as an integer, others as a double.
		var typed any = v.String()
		if n, err := v.Int64(); err == nil {
			typed = n
		} else if f, err := v.Float64(); err == nil {
			typed = f
		}
		*kvs = append(*kvs, keyValue{key: key, value: v.String(), typed: typed, isJSON: true})
	case nil:
		*kvs = append(*kvs, keyValue{key: key, isJSON: true, null: true})
	case bool:
		value := "off"
		if v {
			value = "on"
		}
		*kvs = append(*kvs, keyValue{key: key, value: value, typed: v, isJSON: true})
	}
	return nil
}

// imageName is the name QEMU's bdrv_refresh_filename gives the image
// filename names (with format, -f): a json: description when it is
// opened with options that change what the image is, else "" (the file
// name).
func (o *opener) imageName(filename, format string) string {
	kvs, err := o.imageOptions(filename, format)
	if err != nil || kvs == nil {
		return ""
	}
	return imageOptsName(kvs)
}

// imageOptsName is the json: name of an image opened with options kvs
// that change what the image is (its driver's strong runtime options,
// e.g. raw's offset or a key secret): driver, file and those options as
// compact JSON, the values as given. It is "" when the file name alone
// describes the image. Without a driver the probed driver's options
// count, and its name is the driver.
func imageOptsName(kvs keyValues) string {
	filename := kvs.get("file.filename")
	driver, hasDriver := kvs.lookup("driver")
	if !hasDriver {
		if driver = probedFormat(filename); driver == "" {
			return ""
		}
	}
	d := formats.Lookup(driver)
	if d == nil {
		return ""
	}
	strong := func(key string) bool {
		for _, s := range d.RuntimeOptions {
			if s.Name == key {
				return s.Strong
			}
		}
		return key == "key-secret" || key == "encrypt.key-secret"
	}
	var extra formats.Object
	for _, kv := range kvs {
		if !strong(kv.key) || extra.Get(kv.key) != nil {
			continue
		}
		// A repeated option keeps its first place and its last value,
		// as in a QDict.
		last := kvs.last(kv.key)
		var value any = last.value
		if last.isJSON {
			value = last.typed
		}
		extra = append(extra, formats.Member{Key: kv.key, Value: value})
	}
	if len(extra) == 0 {
		return ""
	}
	file := formats.Object{{Key: "driver", Value: "file"}, {Key: "filename", Value: filename}}
	obj := append(formats.Object{{Key: "driver", Value: driver}, {Key: "file", Value: file}}, extra...)
	return "json:" + control.MarshalQJSONCompact(obj)
}

// probedFormat is the format probing finds for filename, or "".
func probedFormat(filename string) string {
	f, err := formats.OpenFile(filename, true, false)
	if err != nil {
		return ""
	}
	defer f.Close()
	d, err := formats.ProbeFile(f)
	if err != nil {
		return ""
	}
	return d.Name
}

var errForceShareConflict = errors.New("--force-share/-U conflicts with image options")

// nodeOptions are the options of every block node besides its driver's
// (block.c's bdrv_runtime_opts without driver), which --image-opts gives
// for the image and, as file.NAME, for its file.
var nodeOptions = []formats.OptionSpec{
	{Name: "node-name", Type: formats.OptString},
	{Name: "cache.direct", Type: formats.OptBool},
	{Name: "cache.no-flush", Type: formats.OptBool},
	{Name: "read-only", Type: formats.OptBool},
	{Name: "auto-read-only", Type: formats.OptBool},
	{Name: "detect-zeroes", Type: formats.OptString, Values: []string{"off", "on", "unmap"}},
	{Name: "discard", Type: formats.OptString},
	{Name: "force-share", Type: formats.OptBool},
}

func isNodeOption(key string) bool {
	for _, s := range nodeOptions {
		if s.Name == key {
			return true
		}
	}
	return false
}

// checkNodeOptions checks one node's generic options as bdrv_open_common
// does. isFile: the node is the image's file, whose discard mode QEMU
// sets to unmap.
func checkNodeOptions(values map[string]string, isFile bool) (*formats.Options, error) {
	opts, err := formats.CheckRuntime(nodeOptions, values)
	if err != nil {
		return nil, err
	}
	discard := "unmap"
	if !isFile {
		discard = "ignore"
	}
	if opts.Has("discard") {
		discard = opts.String("discard")
	}
	unmap := false
	switch discard {
	case "on", "unmap":
		unmap = true
	case "off", "ignore":
	default:
		return nil, errors.New("Invalid discard option")
	}
	if opts.String("detect-zeroes") == "unmap" && !unmap {
		return nil, errors.New("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
	}
	if name := opts.String("node-name"); opts.Has("node-name") && !isIdentifier(name) {
		return nil, fmt.Errorf("Invalid node-name: '%s'", name)
	}
	return opts, nil
}

// applyImageOpts reads image options (of --image-opts driver=qcow2,
// file.filename=NAME,... or a json: name) into oo and returns the host
// file name. The format driver's own options go to oo.Runtime, for
// formats.Open to check. lateErr is an error QEMU reports only after it
// opened the file.
func (o *opener) applyImageOpts(kvs keyValues, oo *formats.OpenOptions) (filename string, lateErr, err error) {
	qcowKey := false // the secret came as qcow2's encrypt.key-secret
	node, fileNode, fileProto := map[string]string{}, map[string]string{}, map[string]string{}
	var unknownFileOption string
	for _, kv := range kvs {
		if kv.null {
			continue
		}
		switch kv.key {
		case "driver":
			if formats.Lookup(kv.value) == nil {
				return "", nil, fmt.Errorf("Unknown driver '%s'", kv.value)
			}
			oo.Format = kv.value
		case "file.filename":
			filename = kv.value
		case "file.driver":
			if kv.value != "file" {
				return "", nil, fmt.Errorf("Unknown protocol '%s'", kv.value)
			}
		case "file":
			// A plain "file=NAME" names an existing block node, which
			// qemu-img never has.
			return "", nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", kv.value, kv.value)
		case "key-secret":
			// Checked against the driver below: driver= may come later.
			oo.KeySecret = kv.value
		case "encrypt.key-secret":
			// qcow2's and qcow's name for the same secret; also
			// checked below.
			oo.KeySecret = kv.value
			qcowKey = true
		default:
			rest, isFile := strings.CutPrefix(kv.key, "file.")
			switch {
			case isFile && isNodeOption(rest):
				fileNode[rest] = kv.value
			case isFile && formats.UnknownOption(formats.FileRuntimeOptions, map[string]string{rest: ""}) == "":
				fileProto[rest] = kv.value
			case isFile:
				if unknownFileOption == "" {
					unknownFileOption = rest
				}
			case isNodeOption(kv.key):
				node[kv.key] = kv.value
			default:
				if oo.Runtime == nil {
					oo.Runtime = map[string]string{}
				}
				oo.Runtime[kv.key] = kv.value
			}
		}
	}
	if qcowKey && oo.Format != "" && oo.Format != "qcow2" && oo.Format != "qcow" {
		return "", nil, fmt.Errorf("Block format '%s' does not support the option 'encrypt.key-secret'", oo.Format)
	}
	if !qcowKey && oo.KeySecret != "" && oo.Format != "" && oo.Format != "luks" {
		// Without driver= the probed driver takes it, as in QEMU.
		return "", nil, fmt.Errorf("Block format '%s' does not support the option 'key-secret'", oo.Format)
	}
	switch {
	case filename == "" && oo.Format == "":
		return "", nil, errors.New("Must specify either driver or file")
	case filename == "":
		return "", nil, errors.New(`A block device must be specified for "file"`)
	}
	// The image's own generic options, which its file inherits. QEMU
	// opens the file node first, so the file's option errors come
	// before the image's.
	opts, nodeErr := checkNodeOptions(node, false)
	if nodeErr == nil {
		if opts.Has("force-share") {
			if o.forceShare && !opts.Bool("force-share") {
				return "", nil, errForceShareConflict
			}
			oo.ForceShare = opts.Bool("force-share")
		}
		oo.ReadOnly = oo.ReadOnly || opts.Bool("read-only")
		if opts.Has("cache.direct") {
			oo.Direct = opts.Bool("cache.direct")
		}
		oo.NoFlush = oo.NoFlush || opts.Bool("cache.no-flush")
	}
	if lateErr, err = o.applyFileOpts(fileNode, fileProto, unknownFileOption, oo); err != nil || lateErr != nil {
		return filename, lateErr, err
	}
	if nodeErr != nil {
		return filename, nodeErr, nil
	}
	if a := opts.String("node-name"); a != "" && a == fileNode["node-name"] {
		return filename, fmt.Errorf("Duplicate nodes with node-name='%s'", a), nil
	}
	return filename, nil, nil
}

// applyFileOpts checks the options of the image's file node (fileNode
// the generic ones, fileProto the file protocol's, unknown the first one
// that is neither) and applies those imgfs honours. lateErr is an error
// QEMU reports only once the file is open.
func (o *opener) applyFileOpts(fileNode, fileProto map[string]string, unknown string, oo *formats.OpenOptions) (lateErr, err error) {
	node, err := checkNodeOptions(fileNode, true)
	if err != nil {
		return nil, err
	}
	proto, err := formats.CheckRuntime(formats.FileRuntimeOptions, fileProto)
	if err != nil {
		return nil, err
	}
	if proto.Has("pr-manager") {
		// Only secret objects exist in imgfs.
		return nil, fmt.Errorf("No persistent reservation manager with id '%s'", proto.String("pr-manager"))
	}
	if node.Bool("force-share") {
		if !oo.ReadOnly {
			return nil, errors.New("force-share=on can only be used with read-only images")
		}
		oo.ForceShare = true
	}
	if node.Has("cache.direct") {
		oo.Direct = node.Bool("cache.direct")
	}
	oo.NoFlush = oo.NoFlush || node.Bool("cache.no-flush")
	oo.NoLock = proto.String("locking") == "off"
	switch {
	case proto.String("aio") == "native" && !oo.Direct:
		return errors.New("aio=native was specified, but it requires cache.direct=on, which was not specified."), nil
	case unknown != "":
		return fmt.Errorf("Block protocol 'file' doesn't support the option '%s'", unknown), nil
	case node.Bool("read-only") && !oo.ReadOnly:
		return errors.New("Block node is read-only"), nil
	}
	return nil, nil
}
