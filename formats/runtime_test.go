package formats_test

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// optsSpecs are the runtime options of the "imgfs-opts" test driver,
// whose files hold "OPTS\n" and a backing file name line.
var optsSpecs = []formats.OptionSpec{
	{Name: "n", Type: formats.OptSize, Default: "4k"},
	{Name: "mode", Type: formats.OptString, Values: []string{"a", "b"}, Default: "a"},
	{Name: "flag", Type: formats.OptBool},
}

func init() {
	formats.Register(&formats.Driver{
		Name:           "imgfs-opts",
		RuntimeOptions: optsSpecs,
		Probe: func(buf []byte, _ string) int {
			if bytes.HasPrefix(buf, []byte("OPTS\n")) {
				return 100
			}
			return 0
		},
		Open: openOpts,
	})
}

// optsImage is an imgfs-opts image: the runtime options it was opened
// with, and its backing image.
type optsImage struct {
	chainImage
	rt *formats.Options
}

func openOpts(f *formats.File, o *formats.OpenOptions) (formats.Image, error) {
	rt, err := o.RuntimeValues(optsSpecs)
	if err != nil {
		f.Close()
		return nil, err
	}
	img, err := openChain(f, o)
	if err != nil {
		return nil, err
	}
	return &optsImage{chainImage: *img.(*chainImage), rt: rt}, nil
}

func TestCheckRuntime(t *testing.T) {
	for _, tc := range []struct {
		values map[string]string
		err    string
	}{
		{map[string]string{}, ""},
		{map[string]string{"n": "1M", "mode": "b", "flag": "on"}, ""},
		{map[string]string{"n": "x"}, "Parameter 'n' expects a non-negative number below 2^64\n" +
			"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."},
		{map[string]string{"flag": "x"}, "Parameter 'flag' expects 'on' or 'off'"},
		{map[string]string{"mode": "c"}, "invalid parameter value: c"},
		// Types are checked before enums, whatever the names.
		{map[string]string{"mode": "c", "n": "x"}, "Parameter 'n' expects a non-negative number"},
		{map[string]string{"other": "1"}, "Invalid parameter 'other'"},
	} {
		_, err := formats.CheckRuntime(optsSpecs, tc.values)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%v: %v", tc.values, err)
		case tc.err != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.err)):
			t.Errorf("%v: error %v, want %q", tc.values, err, tc.err)
		}
	}
	if got := formats.UnknownOption(optsSpecs, map[string]string{"n": "1", "zz": "1", "y": "2"}); got != "y" {
		t.Errorf("UnknownOption = %q, want the first unknown name, y", got)
	}
}

func TestOpenRuntimeOptions(t *testing.T) {
	dir := t.TempDir()
	base := write(t, filepath.Join(dir, "base"), "OPTS\n")
	top := write(t, filepath.Join(dir, "top"), "OPTS\nbase\n")
	img, err := formats.Open(top, formats.OpenOptions{ReadOnly: true, Runtime: map[string]string{"n": "1M", "flag": "on"}})
	if err != nil {
		t.Fatal(err)
	}
	rt := img.(*optsImage).rt
	if n, _ := rt.Uint("n"); n != 1<<20 || !rt.Bool("flag") || rt.String("mode") != "a" {
		t.Errorf("the driver got n=%d flag=%v mode=%q", n, rt.Bool("flag"), rt.String("mode"))
	}
	// The options are the image's, not its backing file's.
	brt := img.(*optsImage).backing.(*optsImage).rt
	if brt.Has("n") || brt.Has("flag") {
		t.Error("the backing image got the top image's runtime options")
	}
	img.Close()

	for _, tc := range []struct {
		values map[string]string
		err    string
	}{
		{map[string]string{"bogus": "1"}, "Block format 'imgfs-opts' does not support the option 'bogus'"},
		{map[string]string{"mode": "z"}, "invalid parameter value: z"},
		{map[string]string{"flag": "maybe", "bogus": "1"}, "Parameter 'flag' expects 'on' or 'off'"},
	} {
		if _, err := formats.Open(base, formats.OpenOptions{ReadOnly: true, Runtime: tc.values}); err == nil || err.Error() != tc.err {
			t.Errorf("%v: error %v, want %q", tc.values, err, tc.err)
		}
	}
	// raw does not take the test driver's options.
	if _, err := formats.Open(base, formats.OpenOptions{Format: "raw", ReadOnly: true, Runtime: map[string]string{"n": "1"}}); err == nil ||
		err.Error() != "Block format 'raw' does not support the option 'n'" {
		t.Errorf("raw with option n: %v", err)
	}
}

// TestOpenNoLock: two writers conflict on QEMU's locks unless both open
// without locking (the file protocol's locking=off).
func TestOpenNoLock(t *testing.T) {
	name := write(t, filepath.Join(t.TempDir(), "img"), "OPTS\n")
	a, err := formats.Open(name, formats.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := formats.Open(name, formats.OpenOptions{}); err == nil {
		b.Close()
		t.Error("a second writer opened a locked image")
	}
	a.Close()
	a, err = formats.Open(name, formats.OpenOptions{NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := formats.Open(name, formats.OpenOptions{NoLock: true})
	if err != nil {
		t.Fatalf("without locking: %v", err)
	}
	b.Close()
}
