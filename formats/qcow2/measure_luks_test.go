package qcow2

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestMeasureLUKSMatchesQemu: the LUKS header region takes whole
// clusters on top of the image's own sizes. qemu-img benchmarks PBKDF2
// for every LUKS measure, so the cases are few.
func TestMeasureLUKSMatchesQemu(t *testing.T) {
	haveQemu(t)
	src := filepath.Join(t.TempDir(), "r.raw")
	if err := os.WriteFile(src, make([]byte, 100000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ opts, size, src string }{
		{opts: "", size: "1G"},
		{opts: ",encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,cluster_size=1k", src: src},
	} {
		opts := "encrypt.format=luks,encrypt.key-secret=sec0" + tc.opts
		args := []string{"--object", cryptSecretObj, "-o", opts}
		if tc.src != "" {
			args = append(args, "-f", "raw", tc.src)
		} else {
			args = append(args, "--size", tc.size)
			opts += ",size=" + tc.size
		}
		var want formats.MeasureResult
		// formatstest.Exec retries QEMU's failing PBKDF2 benchmark.
		out := formatstest.Exec(t, "qemu-img", append([]string{"measure", "-O", "qcow2", "--output=json"}, args...)...)
		if err := json.Unmarshal([]byte(out), &struct {
			Required       *int64 `json:"required"`
			FullyAllocated *int64 `json:"fully-allocated"`
		}{&want.Required, &want.FullyAllocated}); err != nil {
			t.Fatalf("qemu-img measure %q: %v\n%s", args, err, out)
		}
		got, err := ourCryptMeasure(t, opts, tc.src)
		if err != nil || *got != want {
			t.Errorf("measure %s: got %+v, %v; qemu-img %+v", opts, got, err, want)
		}
	}
}

func ourCryptMeasure(t *testing.T, opts, src string) (*formats.MeasureResult, error) {
	t.Helper()
	o := formats.NewOptions(Driver.CreateSpecs())
	o.Secrets = map[string][]byte{"sec0": []byte("abc")}
	if err := o.Parse(opts); err != nil {
		t.Fatalf("options %q: %v", opts, err)
	}
	var img formats.Image
	if src != "" {
		var err error
		if img, err = formats.Open(src, formats.OpenOptions{Format: "raw", ReadOnly: true}); err != nil {
			t.Fatal(err)
		}
		defer img.Close()
	}
	return Driver.Measure(o, img)
}

// TestMeasureLUKSErrors: the encryption options are checked after the
// qcow2 ones, with QEMU's messages (option values named without the
// "encrypt." prefix, the secret with it).
func TestMeasureLUKSErrors(t *testing.T) {
	for _, tc := range []struct{ opts, want string }{
		{"size=1G,encrypt.format=luks", "Parameter 'encrypt.key-secret' is required for cipher"},
		{"size=1G,encrypt.format=luks,encrypt.key-secret=sec9", "No secret with id 'sec9'"},
		{"size=1G,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=bad", "Parameter 'cipher-alg' does not accept value 'bad'"},
		{"size=1G,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=cast5-128", "Unsupported cipher mode xts"},
		{"size=1G,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=des", "Algorithm 'des' not supported"},
		{"size=1G,encrypt.format=luks,compat=0.9", "Invalid compatibility level: '0.9'"},
	} {
		_, err := ourCryptMeasure(t, tc.opts, "")
		if err == nil || err.Error() != tc.want {
			t.Errorf("measure %s: error %v, want %q", tc.opts, err, tc.want)
		}
	}
}
