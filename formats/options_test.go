package formats_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
	_ "github.com/imgfs/imgfs/formats/raw"
)

// sizeCases are qemu_strtosz inputs with the values qemu-img 7.2 gives
// them (-o size=...); err is "syntax" or "range".
var sizeCases = []struct {
	in   string
	want uint64
	err  string
}{
	{"0", 0, ""},
	{"1", 1, ""},
	{"1b", 1, ""},
	{"1B", 1, ""},
	{"1k", 1024, ""},
	{"1K", 1024, ""},
	{"2M", 2 << 20, ""},
	{"1g", 1 << 30, ""},
	{"1t", 1 << 40, ""},
	{"1p", 1 << 50, ""},
	{"1e", 1 << 60, ""},
	{"1E", 1 << 60, ""},
	{"+1k", 1024, ""},
	{" 1", 1, ""},
	{"\t1", 1, ""},
	{"010", 10, ""},
	{"0x10", 16, ""},
	{"0X10", 16, ""},
	{"0x1E", 30, ""}, // E is a hex digit here, not exa
	{"0xfE", 254, ""},
	{"0x10k", 16384, ""}, // deprecated, but accepted
	{"0x1G", 1 << 30, ""},
	{"1.5k", 1536, ""},
	{"1.1k", 1126, ""},
	{"1.k", 1024, ""},
	{"1.", 1, ""},
	{"1.0", 1, ""},
	{"1.0b", 1, ""},
	{"1.5E", 3 << 59, ""},
	{"0.1E", 115292150460684704, ""},
	{"0.0005k", 1, ""},        // 0.512 rounds up
	{"0.00048828125k", 1, ""}, // exactly 0.5 rounds up
	{"0.000488281k", 0, ""},
	{"0.0001k", 0, ""},
	{"1.00000000000000000001k", 1024, ""},
	{"15.9999999999E", 18446744073594259456, ""},
	{"15.99999999999999999E", 15 << 60, ""}, // the fraction rounds to 1.0, which QEMU drops
	{"12345678901234567890", 12345678901234567890, ""},
	{"18446744073709551615", 18446744073709551615, ""},
	{"0x8000000000000000", 1 << 63, ""},
	{"18446744073709551616", 0, "range"},
	{"16E", 0, "range"},
	{"17179869183.9999999999999G", 0, "range"},
	{"", 0, "syntax"},
	{"k", 0, "syntax"},
	{"1.5", 0, "syntax"},
	{"0.5", 0, "syntax"},
	{"0.5b", 0, "syntax"},
	{"3.2", 0, "syntax"},
	{"1 ", 0, "syntax"},
	{"1kB", 0, "syntax"},
	{"1_0", 0, "syntax"},
	{"0b1", 0, "syntax"},
	{".5k", 0, "syntax"},
	{"1.5e3k", 0, "syntax"},
	{"-0", 0, "syntax"},
	{"-1", 0, "syntax"},
	{"+-1", 0, "syntax"},
	{"1.-5k", 0, "syntax"},
	{"1.+5k", 0, "syntax"},
	{"1. 5k", 0, "syntax"},
	{"1.nank", 0, "syntax"},
	{"1.infk", 0, "syntax"},
	{"0x", 0, "syntax"},
	{"0x1.8", 0, "syntax"},
	{"1kk", 0, "syntax"},
	{"99999999999999999999k", 0, "syntax"}, // overflow, then junk
}

func TestParseSize(t *testing.T) {
	for _, tc := range sizeCases {
		got, err := formats.ParseSize(tc.in)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		case tc.err == "range" && !errors.Is(err, formats.ErrSizeRange):
			t.Errorf("ParseSize(%q) = %d, %v; want a range error", tc.in, got, err)
		case tc.err == "syntax" && (err == nil || errors.Is(err, formats.ErrSizeRange)):
			t.Errorf("ParseSize(%q) = %d, %v; want a syntax error", tc.in, got, err)
		}
	}
}

// qemuCreate runs qemu-img create -f raw with -o list (and size 1M unless
// the list has one) and returns the option summary of its "Formatting"
// line and its error message without the "qemu-img: NAME: " prefix.
func qemuCreate(t *testing.T, name, list string) (summary, errMsg string) {
	t.Helper()
	args := []string{"create", "-f", "raw", "-o", list, name}
	if !strings.Contains(","+list, ",size=") {
		args = append(args, "1M")
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("qemu-img", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Run()
	summary = strings.TrimSuffix(strings.TrimPrefix(stdout.String(), "Formatting '"+name+"', fmt=raw "), "\n")
	// qemu_strtosz's deprecation warning for hex with a suffix is not an
	// error; imgfs does not print it.
	msg := stderr.String()
	for strings.HasPrefix(msg, "qemu-img: warning: ") {
		msg = msg[strings.IndexByte(msg, '\n')+1:]
	}
	return summary, strings.TrimSuffix(strings.TrimPrefix(msg, "qemu-img: "+name+": "), "\n")
}

// ourCreate does what qemu-img create does with the options: parse,
// print the summary, create.
func ourCreate(name, list string) (summary, errMsg string) {
	d := formats.Lookup("raw")
	o := formats.NewOptions(d.CreateSpecs())
	if err := o.Parse(list); err != nil {
		return "", err.Error()
	}
	if !o.Has("size") {
		o.Set("size", "1048576")
	}
	if err := d.Create(name, o); err != nil {
		return o.Summary(), err.Error()
	}
	return o.Summary(), ""
}

// TestOptionsAgainstQemu parses -o lists as qemu-img create -f raw does
// and compares the "Formatting" summary and the error messages.
func TestOptionsAgainstQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	lists := []string{
		"nocow=on",
		"nocow=yes",
		"nocow=true,nocow=y",
		"nocow=maybe",
		"nocow=ON",
		"nocow=",
		"nocow",
		"nonocow",
		"preallocation=off",
		"preallocation=falloc",
		"preallocation=full",
		"preallocation=xx",
		"preallocation=a,,b",
		"preallocation=",
		"preallocation=off=x",
		"extent_size_hint=0,preallocation=off,nocow=on",
		"extent_size_hint=1M",
		"extent_size_hint=-1",
		"extent_size_hint=16E",
		"extent_size_hint=5G",
		"bogus=1",
		"=5",
		"a,,b=1",
		"size=2k",
		"size=1.5k",
		"size=0x10",
		"size=1k,size=2k",
		"size=1k,,size=2k",
		"size=1k,,,size=2k",
		"size",
		"nosize",
	}
	for _, s := range sizeCases {
		lists = append(lists, "size="+s.in)
	}
	for i, list := range lists {
		theirs, ours := filepath.Join(dir, fmt.Sprintf("q%d", i)), filepath.Join(dir, fmt.Sprintf("o%d", i))
		wantSum, wantErr := qemuCreate(t, theirs, list)
		gotSum, gotErr := ourCreate(ours, list)
		switch {
		case strings.HasPrefix(wantErr, "Could not resize file"), strings.HasPrefix(wantErr, "The image size is too large"):
			// A size QEMU parses but cannot create: compare the parse only.
			gotErr, wantErr = "", ""
		case wantErr == "Image creation needs a size parameter":
			// bdrv_img_create takes size 2^64-1 for "no size"; that is
			// the create command's business, not the options'.
			continue
		}
		if gotSum != wantSum || gotErr != wantErr {
			t.Errorf("-o %q:\n got %q, %q\nwant %q, %q", list, gotSum, gotErr, wantSum, wantErr)
		}
		os.Remove(ours)
	}
}

func TestNumberOption(t *testing.T) {
	// refcount_bits is a number option in qcow2; its parse errors come
	// from QemuOpts before qcow2 looks at it (checked against qemu-img
	// create -f qcow2 -o refcount_bits=...).
	specs := []formats.OptionSpec{{Name: "refcount_bits", Type: formats.OptNumber}}
	for _, tc := range []struct{ in, summary, err string }{
		{"16", "refcount_bits=16", ""},
		{"010", "refcount_bits=8", ""},
		{"0x10", "refcount_bits=16", ""},
		{" 16", "refcount_bits=16", ""},
		{"+16", "refcount_bits=16", ""},
		{"-1", "refcount_bits=-1", ""},
		{"18446744073709551615", "refcount_bits=-1", ""},
		{"99999999999999999999", "", "Value '99999999999999999999' is too large for parameter 'refcount_bits'"},
		{"1_6", "", "Parameter 'refcount_bits' expects a number"},
		{"16k", "", "Parameter 'refcount_bits' expects a number"},
		{"0b1", "", "Parameter 'refcount_bits' expects a number"},
		{"0x", "", "Parameter 'refcount_bits' expects a number"},
		{"", "", "Parameter 'refcount_bits' expects a number"},
	} {
		o := formats.NewOptions(specs)
		err := o.Parse("refcount_bits=" + tc.in)
		if got := fmt.Sprint(err); tc.err != "" && got != tc.err || tc.err == "" && err != nil {
			t.Errorf("%q: error %v, want %q", tc.in, err, tc.err)
		}
		if err == nil && o.Summary() != tc.summary {
			t.Errorf("%q: summary %q, want %q", tc.in, o.Summary(), tc.summary)
		}
	}
}

func TestOptionsDefaults(t *testing.T) {
	specs := []formats.OptionSpec{
		{Name: "cluster_size", Type: formats.OptSize, Default: "65536"},
		{Name: "size", Type: formats.OptSize},
		{Name: "lazy_refcounts", Type: formats.OptBool, Default: "off"},
		{Name: "backing_file", Type: formats.OptString},
	}
	o := formats.NewOptions(specs)
	if err := o.Parse("lazy_refcounts,size=1k"); err != nil {
		t.Fatal(err)
	}
	if got, want := o.Summary(), "cluster_size=65536 size=1024 lazy_refcounts=on"; got != want {
		t.Errorf("Summary() = %q, want %q", got, want)
	}
	if n, ok := o.Uint("cluster_size"); !ok || n != 65536 {
		t.Errorf("Uint(cluster_size) = %d, %v", n, ok)
	}
	if _, ok := o.Uint("backing_file"); ok {
		t.Errorf("Uint of an unset option without default reports set")
	}
	if !o.Bool("lazy_refcounts") || o.Has("cluster_size") || !o.Has("size") {
		t.Errorf("Bool/Has wrong: %v %v %v", o.Bool("lazy_refcounts"), o.Has("cluster_size"), o.Has("size"))
	}
	o.Unset("size")
	if o.Has("size") || o.String("size") != "" {
		t.Errorf("Unset left size=%q", o.String("size"))
	}
}

func TestHelpAgainstQemu(t *testing.T) {
	formatstest.RequireTools(t, "qemu-img")
	want, err := exec.Command("qemu-img", "create", "-f", "raw", "-o", "help", "x").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := formats.Help(formats.Lookup("raw").CreateSpecs()); got != string(want) {
		t.Errorf("Help:\n%s\nqemu-img:\n%s", got, want)
	}
}

func TestHelpPadding(t *testing.T) {
	got := formats.Help([]formats.OptionSpec{
		{Name: "b", Type: formats.OptNumber, Help: "short"},
		{Name: "data_file_raw", Type: formats.OptBool, Help: "long name"},
		{Name: "a", Type: formats.OptString},
	})
	want := "Supported options:\n" +
		"  a=<str>\n" +
		"  b=<num>                - short\n" +
		"  data_file_raw=<bool (on/off)> - long name\n"
	if got != want {
		t.Errorf("Help:\n%q\nwant\n%q", got, want)
	}
}

func FuzzParseSize(f *testing.F) {
	for _, tc := range sizeCases {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := formats.ParseSize(s)
		if err != nil {
			return
		}
		// Case does not matter: suffixes and hex digits are both
		// case-insensitive.
		if m, err := formats.ParseSize(strings.ToUpper(s)); err != nil || m != n {
			t.Errorf("ParseSize(%q) = %d but ParseSize(upper) = %d, %v", s, n, m, err)
		}
		// The decimal rendering of the value reads back as the value.
		if m, err := formats.ParseSize(strconv.FormatUint(n, 10)); err != nil || m != n {
			t.Errorf("ParseSize(%q) = %d does not round-trip: %d, %v", s, n, m, err)
		}
		// A plain decimal number with a "k" suffix is 1024 times as much.
		if _, err := strconv.ParseUint(s, 10, 64); err == nil && n <= 1<<54 {
			if m, err := formats.ParseSize(s + "k"); err != nil || m != n*1024 {
				t.Errorf("ParseSize(%q+k) = %d, %v; want %d", s, m, err, n*1024)
			}
		}
	})
}

func FuzzOptionsParse(f *testing.F) {
	specs := append([]formats.OptionSpec{
		{Name: "refcount_bits", Type: formats.OptNumber},
		{Name: "backing_file", Type: formats.OptString},
		{Name: "lazy_refcounts", Type: formats.OptBool},
	}, formats.ProtocolOptions...)
	for _, s := range []string{"size=1k", "nocow", "nonocow,preallocation=a,,b", "backing_file=x,,y,,,refcount_bits=0x10",
		"=5", "a,,b=1", "size=1k,,size=2k", "lazy_refcounts=yes,extent_size_hint=1.5M"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, list string) {
		o := formats.NewOptions(specs)
		if err := o.Parse(list); err != nil {
			return
		}
		// The values, written back as an option list with commas
		// doubled, parse to the same values.
		var items []string
		for _, s := range specs {
			if o.Has(s.Name) {
				items = append(items, s.Name+"="+strings.ReplaceAll(o.String(s.Name), ",", ",,"))
			}
		}
		again := formats.NewOptions(specs)
		if err := again.Parse(strings.Join(items, ",")); err != nil {
			t.Fatalf("%q parsed, but its values %q do not: %v", list, items, err)
		}
		for _, s := range specs {
			if o.Has(s.Name) != again.Has(s.Name) || o.String(s.Name) != again.String(s.Name) {
				t.Errorf("%q: %s=%q, after a round trip %q", list, s.Name, o.String(s.Name), again.String(s.Name))
			}
		}
		if o.Summary() != again.Summary() {
			t.Errorf("%q: summary %q, after a round trip %q", list, o.Summary(), again.Summary())
		}
	})
}
