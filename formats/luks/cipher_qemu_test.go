package luks

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// cipherMatrix is every cipher and mode QEMU 7.2 creates LUKS images
// with, each with every IV generator; ESSIV's hash alternates between
// the two digest sizes that key a cipher of every family (MD5 and
// SHA-256, where the family has such a key size) and the PBKDF2 hash
// is taken in turn.
func cipherMatrix() []Spec {
	var specs []Spec
	essivHashes := []string{"md5", "sha256"}
	for _, alg := range slices.Sorted(maps.Keys(cipherAlgs)) {
		for _, mode := range []string{"xts", "cbc", "ecb", "ctr"} {
			for _, ivgen := range []string{"plain", "plain64", "essiv"} {
				s := Spec{CipherAlg: alg, CipherMode: mode, IVGenAlg: ivgen, HashAlg: hashNames[len(specs)%len(hashNames)]}
				if ivgen == "essiv" {
					s.IVGenHashAlg = essivHashes[len(specs)%2]
					if s.validate() != nil {
						s.IVGenHashAlg = essivHashes[(len(specs)+1)%2]
					}
				}
				if s.validateCreate() == nil {
					specs = append(specs, s)
				}
			}
		}
	}
	return specs
}

func (s Spec) createOptions() string {
	o := fmt.Sprintf(",cipher-alg=%s,cipher-mode=%s,ivgen-alg=%s,hash-alg=%s", s.CipherAlg, s.CipherMode, s.IVGenAlg, s.HashAlg)
	if s.IVGenHashAlg != "" {
		o += ",ivgen-hash-alg=" + s.IVGenHashAlg
	}
	return o
}

// TestCipherMatrixAgainstQEMU creates an image of each scheme with imgfs
// and fills it; qemu-img must read it back, and what qemu-io then writes
// into it must read back through imgfs. info must match qemu-img's.
func TestCipherMatrixAgainstQEMU(t *testing.T) {
	needQEMU(t)
	specs := cipherMatrix()
	if len(specs) < 80 {
		t.Fatalf("only %d schemes in the matrix", len(specs))
	}
	for i, s := range specs {
		t.Run(strings.TrimPrefix(strings.ReplaceAll(s.createOptions(), ",", " "), " "), func(t *testing.T) {
			t.Parallel()
			const size = 64 << 10
			name := newImage(t, s.createOptions(), size)
			img := openLUKS(t, name, false)
			want := make([]byte, size)
			for i := range want {
				want[i] = byte(i*13 + i>>9)
			}
			if _, err := img.WriteAt(want, 0); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(filepath.Dir(name), "want.raw")
			if err := os.WriteFile(raw, want, 0o644); err != nil {
				t.Fatal(err)
			}
			if out := run(t, "qemu-img", "compare", "--object", secretObj, "--image-opts", imageOpts(name), "driver=raw,file.filename="+raw); out != "Images are identical.\n" {
				t.Fatalf("qemu-img compare: %s", out)
			}
			run(t, "qemu-io", "--object", secretObj, "--image-opts", imageOpts(name), "-c", "write -P 0x5a 1000 7000", "-c", "write -P 0x33 32768 512")
			copy(want[1000:8000], bytes.Repeat([]byte{0x5a}, 7000))
			copy(want[32768:33280], bytes.Repeat([]byte{0x33}, 512))
			img = openLUKS(t, name, true)
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("what qemu-io wrote reads differently")
			}
			if i%4 == 0 {
				// info shows the names; a quarter of the schemes
				// covers every one.
				checkInfo(t, name)
			}
		})
	}
}
