package formats

import (
	"errors"
	"fmt"
	"math"
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
}

// ProtocolOptions are the file protocol's creation options, which QEMU
// appends to every format's own.
var ProtocolOptions = []OptionSpec{
	{Name: "size", Type: OptSize, Help: "Virtual disk size"},
	{Name: "preallocation", Type: OptString, Help: "Preallocation mode (allowed values: off, falloc, full)"},
	{Name: "nocow", Type: OptBool, Help: "Turn off copy-on-write (valid only on btrfs)"},
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
	Specs  []OptionSpec
	values map[string]string
}

// NewOptions returns an empty set of options for specs.
func NewOptions(specs []OptionSpec) *Options {
	return &Options{Specs: specs, values: map[string]string{}}
}

// Parse adds "name=value,name=value" (QemuOpts syntax: ",," is a literal
// comma, a bare name means name=on) to o.
func (o *Options) Parse(list string) error {
	for _, item := range splitOptions(list) {
		if item == "" {
			continue
		}
		name, value, hasValue := strings.Cut(item, "=")
		if !hasValue {
			value = "on"
		}
		if err := o.Set(name, value); err != nil {
			return err
		}
	}
	return nil
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

// Set validates value against the option's type and stores it.
func (o *Options) Set(name, value string) error {
	spec := findSpec(o.Specs, name)
	if spec == nil {
		return fmt.Errorf("Invalid parameter '%s'", name)
	}
	switch spec.Type {
	case OptBool:
		if _, err := ParseBool(value); err != nil {
			return fmt.Errorf("Parameter '%s' expects 'on' or 'off'", name)
		}
	case OptNumber:
		if _, err := strconv.ParseUint(value, 0, 64); err != nil {
			return fmt.Errorf("Parameter '%s' expects a number", name)
		}
	case OptSize:
		if _, err := ParseSize(value); err != nil {
			return fmt.Errorf("Parameter '%s' expects a non-negative number below 2^64\n"+
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
	n, err := strconv.ParseUint(v, 0, 64)
	return n, err == nil
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
		if given && (s.Type == OptSize || s.Type == OptNumber) {
			n, _ := o.Uint(s.Name)
			v = strconv.FormatUint(n, 10)
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

// ParseSize parses a byte count with an optional k/M/G/T/P/E suffix
// (binary units, case-insensitive, "B" for bytes), as qemu_strtosz does.
// A fraction is allowed before a suffix ("1.5G").
func ParseSize(s string) (uint64, error) {
	num := strings.TrimRight(s, "bBkKmMgGtTpPeE")
	suffix := s[len(num):]
	if num == "" || len(suffix) > 1 || strings.HasPrefix(num, "-") || strings.HasPrefix(num, "+") ||
		strings.ContainsAny(num, " \t") {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	shift := 0
	if suffix != "" {
		shift = 10 * strings.IndexByte("bkmgtpe", toLower(suffix[0]))
	}
	if strings.ContainsAny(num, ".eE") || strings.HasPrefix(num, "0x") && shift != 0 {
		f, err := strconv.ParseFloat(num, 64)
		if err != nil || strings.HasPrefix(num, "0x") {
			return 0, fmt.Errorf("invalid size %q", s)
		}
		v := f * math.Exp2(float64(shift))
		if v >= math.Exp2(64) {
			return 0, fmt.Errorf("size %q too large", s)
		}
		return uint64(v), nil
	}
	n, err := strconv.ParseUint(num, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	if shift > 0 && n > math.MaxUint64>>shift {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return n << shift, nil
}

func toLower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
