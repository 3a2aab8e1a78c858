package formats

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// OptionType is the type of a -o option, as QemuOpts types them.
type OptionType int

const (
	OptString OptionType = iota
	OptBool
	OptNumber
	OptSize
)

func (t OptionType) String() string {
	switch t {
	case OptBool:
		return "bool (on/off)"
	case OptNumber:
		return "num"
	case OptSize:
		return "size"
	}
	return "str"
}

// OptionSpec describes one creation option.
type OptionSpec struct {
	Name string
	Type OptionType
	Help string
	// Default is printed by create's "Formatting" line when the option is
	// not given; "" means the option is left out.
	Default string
	// Values, for a runtime option that is a QAPI enum, are the values
	// it takes (see CheckRuntime).
	Values []string
	// Strong marks a runtime option that changes what the image is
	// (QEMU's strong_runtime_opts, e.g. raw's offset): an image opened
	// with it is called by a json: description, not its file name.
	Strong bool
}

// ProtocolOptions are the file protocol's creation options, which QEMU
// appends to every format's own, in file-posix's table order.
var ProtocolOptions = []OptionSpec{
	{Name: "size", Type: OptSize, Help: "Virtual disk size"},
	{Name: "nocow", Type: OptBool, Help: "Turn off copy-on-write (valid only on btrfs)"},
	{Name: "preallocation", Type: OptString, Help: "Preallocation mode (allowed values: off, falloc, full)"},
	{Name: "extent_size_hint", Type: OptSize, Help: "Extent size hint for the image file, 0 to disable"},
}

// CreateSpecs returns a driver's creation options followed by the
// protocol's options it does not already have, as qemu_opts_append merges
// them.
func (d *Driver) CreateSpecs() []OptionSpec {
	out := append([]OptionSpec(nil), d.CreateOptions...)
	for _, p := range ProtocolOptions {
		if findSpec(out, p.Name) == nil {
			out = append(out, p)
		}
	}
	return out
}

// FileRuntimeOptions are the file protocol's runtime options
// (file-posix's runtime_opts besides the filename), which --image-opts
// gives as file.NAME. imgfs honours locking=off (OpenOptions.NoLock);
// the others tune QEMU's I/O paths and are only checked.
var FileRuntimeOptions = []OptionSpec{
	{Name: "aio", Type: OptString, Help: "host AIO implementation (threads, native, io_uring)",
		Values: []string{"threads", "native", "io_uring"}},
	{Name: "aio-max-batch", Type: OptNumber, Help: "AIO max batch size (0 = auto handled by AIO backend, default: 0)"},
	{Name: "locking", Type: OptString, Help: "file locking mode (on/off/auto, default: auto)",
		Values: []string{"off", "on", "auto"}},
	{Name: "pr-manager", Type: OptString, Help: "id of persistent reservation manager object (default: none)"},
	{Name: "drop-cache", Type: OptBool, Help: "invalidate page cache during live migration (default: on)"},
	{Name: "x-check-cache-dropped", Type: OptBool, Help: "check that page cache was dropped on live migration (default: off)"},
}

// CheckRuntime checks runtime option values (name to value) against
// specs as QEMU's drivers do when they open an image: first every
// value's type, as qemu_opts_absorb_qdict does, then the enums in table
// order, as the drivers' qapi_enum_parse calls do. An option specs do
// not list is refused with "Invalid parameter"; callers that know the
// driver's name check for those first, with QEMU's wording.
func CheckRuntime(specs []OptionSpec, values map[string]string) (*Options, error) {
	o := NewOptions(specs)
	for _, name := range sortedKeys(values) {
		if err := o.Set(name, values[name]); err != nil {
			return nil, err
		}
	}
	for _, s := range specs {
		if v, ok := o.values[s.Name]; ok && s.Values != nil && !slices.Contains(s.Values, v) {
			return nil, fmt.Errorf("invalid parameter value: %s", v)
		}
	}
	return o, nil
}

// UnknownOption returns the first name in values (in sorted order) that
// specs do not list, or "".
func UnknownOption(specs []OptionSpec, values map[string]string) string {
	for _, name := range sortedKeys(values) {
		if findSpec(specs, name) == nil {
			return name
		}
	}
	return ""
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func findSpec(specs []OptionSpec, name string) *OptionSpec {
	for i := range specs {
		if specs[i].Name == name {
			return &specs[i]
		}
	}
	return nil
}

// Options holds option values given by the user, checked against specs.
type Options struct {
	Specs []OptionSpec
	// Secrets holds the data of --object secret definitions by id, for
	// options such as luks' key-secret that name one.
	Secrets map[string][]byte
	values  map[string]string
}

// NewOptions returns an empty set of options for specs.
func NewOptions(specs []OptionSpec) *Options {
	return &Options{Specs: specs, values: map[string]string{}}
}

// Parse adds "name=value,name=value" to o, item by item as QemuOpts
// reads a list: ",," in a value is a literal comma, a bare name means
// name=on, and a bare "noname" means name=off.
func (o *Options) Parse(list string) error {
	for p := list; p != ""; {
		var name, value string
		n := strings.IndexAny(p, "=,")
		if n < 0 {
			n = len(p)
		}
		if n == len(p) || p[n] == ',' {
			name, p = p[:n], p[n:]
			value = "on"
			if rest, ok := strings.CutPrefix(name, "no"); ok {
				name, value = rest, "off"
			}
		} else {
			name = p[:n]
			value, p = optionValue(p[n+1:])
		}
		p = strings.TrimPrefix(p, ",")
		if err := o.Set(name, value); err != nil {
			return err
		}
	}
	return nil
}

// optionValue reads a value up to the first single comma, turning ",,"
// into ",", and returns it and the rest of the list from that comma on.
func optionValue(s string) (value, rest string) {
	var b strings.Builder
	for {
		i := strings.IndexByte(s, ',')
		if i < 0 {
			b.WriteString(s)
			return b.String(), ""
		}
		if i+1 == len(s) || s[i+1] != ',' {
			b.WriteString(s[:i])
			return b.String(), s[i:]
		}
		b.WriteString(s[:i+1])
		s = s[i+2:]
	}
}

// splitOptions splits a QemuOpts list at single commas.
func splitOptions(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

// HasHelpOption reports whether an -o list asks for help: one of its
// items is "help" or "?" (QEMU's has_help_option).
func HasHelpOption(list string) bool {
	for _, item := range splitOptions(list) {
		if item == "help" || item == "?" {
			return true
		}
	}
	return false
}

// ValidOptionList is QEMU's is_valid_option_list, which qemu-img applies
// to each -o: not empty, not starting with ',', and not ending in an odd
// number of commas (a dangling separator).
func ValidOptionList(list string) bool {
	if list == "" || list[0] == ',' {
		return false
	}
	trailing := len(list) - len(strings.TrimRight(list, ","))
	return trailing%2 == 0
}

// Set validates value against the option's type and stores it. Its
// errors are QEMU's messages tagged ErrInvalidOption.
func (o *Options) Set(name, value string) error {
	spec := findSpec(o.Specs, name)
	if spec == nil {
		return Errorf(ErrInvalidOption, "Invalid parameter '%s'", name)
	}
	switch spec.Type {
	case OptBool:
		if _, err := ParseBool(value); err != nil {
			return Errorf(ErrInvalidOption, "Parameter '%s' expects 'on' or 'off'", name)
		}
	case OptNumber:
		if _, err := parseNumber(value); errors.Is(err, ErrSizeRange) {
			return Errorf(ErrInvalidOption, "Value '%s' is too large for parameter '%s'", value, name)
		} else if err != nil {
			return Errorf(ErrInvalidOption, "Parameter '%s' expects a number", name)
		}
	case OptSize:
		if _, err := ParseSize(value); errors.Is(err, ErrSizeRange) {
			return Errorf(ErrInvalidOption, "Value '%s' is out of range for parameter '%s'", value, name)
		} else if err != nil {
			return Errorf(ErrInvalidOption, "Parameter '%s' expects a non-negative number below 2^64\n"+
				"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"+
				"and exabytes, respectively.", name)
		}
	}
	o.values[name] = value
	return nil
}

// Has reports whether the user gave name.
func (o *Options) Has(name string) bool { _, ok := o.values[name]; return ok }

// Unset forgets a value, for options a command consumes itself.
func (o *Options) Unset(name string) { delete(o.values, name) }

// String returns the value of name, or the spec default, or "".
func (o *Options) String(name string) string {
	if v, ok := o.values[name]; ok {
		return v
	}
	if s := findSpec(o.Specs, name); s != nil {
		return s.Default
	}
	return ""
}

// Bool returns the boolean value of name (false when unset and without
// default). Values were validated by Set.
func (o *Options) Bool(name string) bool {
	b, _ := ParseBool(o.String(name))
	return b
}

// Uint returns the numeric or size value of name, and whether it is set
// (by the user or a default).
func (o *Options) Uint(name string) (uint64, bool) {
	v := o.String(name)
	if v == "" {
		return 0, false
	}
	if s := findSpec(o.Specs, name); s != nil && s.Type == OptSize {
		n, err := ParseSize(v)
		return n, err == nil
	}
	n, err := parseNumber(v)
	return n, err == nil
}

// parseNumber reads a whole string as C's strtoull with base 0 does,
// which is how QemuOpts reads numbers: leading white space, an optional
// sign (a minus wraps around), then hex ("0x"), octal (leading "0") or
// decimal digits. Overflow wraps ErrSizeRange.
func parseNumber(s string) (uint64, error) {
	p := strings.TrimLeft(s, " \t\n\v\f\r")
	neg := strings.HasPrefix(p, "-")
	if neg || strings.HasPrefix(p, "+") {
		p = p[1:]
	}
	base := 10
	switch {
	case len(p) > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X') && digitValue(p[2]) < 16:
		base, p = 16, p[2:]
	case strings.HasPrefix(p, "0"):
		base = 8
	}
	n, rest, err := parseUintPrefix(p, base)
	switch {
	case rest != "" || err != nil && !errors.Is(err, ErrSizeRange):
		return 0, fmt.Errorf("invalid number %q", s)
	case err != nil:
		return 0, fmt.Errorf("number %q: %w", s, ErrSizeRange)
	case neg:
		return -n, nil
	}
	return n, nil
}

// Summary renders the options as qemu_opts_print does for create's
// "Formatting" line: every option in table order that was given or has
// a default, numbers in decimal.
func (o *Options) Summary() string {
	var parts []string
	for _, s := range o.Specs {
		v, given := o.values[s.Name]
		if !given {
			v = s.Default
		}
		if v == "" && !given {
			continue
		}
		switch {
		case given && (s.Type == OptSize || s.Type == OptNumber):
			// qemu_opts_print prints them with PRId64: as signed.
			n, _ := o.Uint(s.Name)
			v = strconv.FormatInt(int64(n), 10)
		case s.Type == OptString:
			// QEMU doubles commas so the line reads back as an option list.
			v = strings.ReplaceAll(v, ",", ",,")
		}
		parts = append(parts, s.Name+"="+v)
	}
	return strings.Join(parts, " ")
}

// Help lists specs as `qemu-img create -o help` does: sorted by name.
func Help(specs []OptionSpec) string {
	lines := make([]string, 0, len(specs))
	for _, s := range specs {
		l := fmt.Sprintf("  %s=<%s>", s.Name, s.Type)
		if s.Help != "" {
			if len(l) < 24 {
				l += strings.Repeat(" ", 24-len(l))
			}
			l += " - " + s.Help
		}
		lines = append(lines, l)
	}
	sort.Strings(lines)
	return "Supported options:\n" + strings.Join(lines, "\n") + "\n"
}

// ParseBool accepts QEMU's spellings of a boolean.
func ParseBool(s string) (bool, error) {
	switch s {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, errors.New("not a boolean")
}

// ErrSizeRange: a size does not fit in 64 bits (qemu_strtosz's ERANGE).
var ErrSizeRange = errors.New("size out of range")

// ParseSize parses a byte count as QEMU 7.2's qemu_strtosz does: leading
// white space, a decimal number with an optional fraction or a hex number
// ("0x..."), then an optional suffix b/k/M/G/T/P/E (binary units,
// case-insensitive). A fraction needs a scaling suffix and is rounded to
// the nearest byte. Errors wrap ErrSizeRange when the value does not fit
// in 64 bits.
func ParseSize(s string) (uint64, error) {
	invalid := fmt.Errorf("invalid size %q", s)
	p := strings.TrimLeft(s, " \t\n\v\f\r")
	if strings.HasPrefix(p, "+") {
		p = p[1:]
	}
	val, rest, err := parseUintPrefix(p, 10)
	if err != nil && !errors.Is(err, ErrSizeRange) {
		return 0, invalid
	}
	if err != nil {
		// Trailing characters turn a range error into a syntax error.
		if rest != "" {
			return 0, invalid
		}
		return 0, fmt.Errorf("size %q: %w", s, ErrSizeRange)
	}
	var frac uint64 // the fraction as 0.64 fixed point
	switch {
	case val == 0 && (strings.HasPrefix(rest, "x") || strings.HasPrefix(rest, "X")):
		if val, rest, err = parseUintPrefix(p[2:], 16); err != nil {
			if errors.Is(err, ErrSizeRange) && rest == "" {
				return 0, fmt.Errorf("size %q: %w", s, ErrSizeRange)
			}
			return 0, invalid
		}
		if strings.HasPrefix(rest, ".") {
			return 0, invalid
		}
	case strings.HasPrefix(rest, "."):
		n := 1
		for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
			n++
		}
		if n < len(rest) && (rest[n] == 'e' || rest[n] == 'E') && n > 1 {
			// strtod would read an exponent; QEMU refuses those.
			if e := strings.TrimLeft(rest[n+1:], "+-"); e != "" && e[0] >= '0' && e[0] <= '9' {
				return 0, invalid
			}
		}
		if n > 1 {
			f, _ := strconv.ParseFloat("0"+rest[:n], 64)
			// A fraction that rounds to 1.0 converts to 0 in QEMU's
			// (uint64_t)(fraction * 0x1p64) on x86-64.
			if f < 1 {
				frac = uint64(f * 0x1p64)
			}
		}
		rest = rest[n:]
	}
	shift := 0
	if rest != "" {
		if i := strings.IndexByte("bkmgtpe", toLower(rest[0])); i >= 0 {
			shift = 10 * i
			rest = rest[1:]
		}
	}
	if rest != "" {
		return 0, invalid
	}
	if shift == 0 {
		if frac != 0 {
			return 0, invalid
		}
		return val, nil
	}
	// Exact 64.64 fixed-point product, rounded half up.
	hi, lo := bits.Mul64(val, 1<<shift)
	fhi, flo := bits.Mul64(frac, 1<<shift)
	var c uint64
	lo, c = bits.Add64(lo, fhi, 0)
	hi += c
	lo, c = bits.Add64(lo, flo>>63, 0)
	hi += c
	if hi != 0 {
		return 0, fmt.Errorf("size %q: %w", s, ErrSizeRange)
	}
	return lo, nil
}

// parseUintPrefix reads the longest run of digits in base from the start
// of s, as strtoull does, and returns the value and what follows. No
// digits is an error; overflow wraps ErrSizeRange.
func parseUintPrefix(s string, base int) (uint64, string, error) {
	n := 0
	for n < len(s) && digitValue(s[n]) < base {
		n++
	}
	if n == 0 {
		return 0, s, errors.New("no digits")
	}
	v, err := strconv.ParseUint(s[:n], base, 64)
	if err != nil {
		return 0, s[n:], ErrSizeRange
	}
	return v, s[n:], nil
}

func digitValue(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return 99
}

func toLower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
