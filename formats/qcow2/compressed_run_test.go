package qcow2

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/imgfs/imgfs/formats"
	"github.com/imgfs/imgfs/formats/formatstest"
)

// TestCompressedRuns reads images whose compressed clusters lie one
// after another in the host file, interleaved with plain, zero and
// unallocated clusters, through windows of every alignment: the batched
// read of a run of compressed clusters must cut the run at each other
// kind of cluster and at a cluster stored elsewhere, and inflate partial
// clusters as well as whole ones.
func TestCompressedRuns(t *testing.T) {
	formatstest.RequireQemu(t)
	for _, tc := range []struct {
		cluster int64
		ctype   string
	}{{512, "zlib"}, {65536, "zlib"}, {65536, "zstd"}, {2 << 20, "zlib"}} {
		t.Run(fmt.Sprintf("%d-%s", tc.cluster, tc.ctype), func(t *testing.T) {
			t.Parallel()
			cs := tc.cluster
			dir := t.TempDir()
			name := filepath.Join(dir, "c.qcow2")
			size := 40 * cs
			// Bytes that vary inside each cluster (qemu-io's patterns do
			// not) and compress: convert -c stores every cluster
			// compressed, in guest order.
			src := make([]byte, size)
			for i := range src {
				src[i] = byte(i>>3) ^ byte(i/int(cs))
			}
			raw := formatstest.WriteTemp(t, "src.raw", src)
			formatstest.Exec(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o",
				fmt.Sprintf("cluster_size=%d,compression_type=%s", cs, tc.ctype), raw, name)
			// Then cluster 10 and 21 become plain, 11 zero, 12
			// unallocated, and 25-34 are compressed again at the end of
			// the file in another order, so host order is not guest
			// order.
			cmds := []string{
				fmt.Sprintf("write -P 10 %d %d", 10*cs, cs),
				fmt.Sprintf("write -P 21 %d %d", 21*cs, cs),
				fmt.Sprintf("write -z %d %d", 11*cs, cs),
				fmt.Sprintf("discard %d %d", 12*cs, cs),
			}
			for _, i := range []int64{30, 31, 32, 33, 34, 25, 26, 27, 28, 29} {
				// A compressed write cannot overwrite: discard first.
				cmds = append(cmds, fmt.Sprintf("discard %d %d", i*cs, cs), fmt.Sprintf("write -c -P %d %d %d", i, i*cs, cs))
			}
			formatstest.QemuIO(t, "qcow2", name, cmds...)
			want := formatstest.QemuRaw(t, "qcow2", name)
			img := formatstest.Open(t, name, formats.OpenOptions{ReadOnly: true})
			defer img.Close()
			rng := rand.New(rand.NewPCG(1, uint64(cs)))
			windows := [][2]int64{{0, size}, {0, 10 * cs}, {cs / 2, 9 * cs}, {5*cs + 7, 17*cs - 3}, {24 * cs, 11 * cs}}
			for range 40 {
				off := rng.Int64N(size)
				windows = append(windows, [2]int64{off, 1 + rng.Int64N(size-off)})
			}
			for _, w := range windows {
				got := make([]byte, w[1])
				if _, err := img.ReadAt(got, w[0]); err != nil {
					t.Fatalf("read %d+%d: %v", w[0], w[1], err)
				}
				if !bytes.Equal(got, want[w[0]:w[0]+w[1]]) {
					t.Fatalf("read %d+%d differs from qemu-img's at %d", w[0], w[1], w[0]+int64(formatstest.FirstDiff(got, want[w[0]:])))
				}
			}
		})
	}
}
