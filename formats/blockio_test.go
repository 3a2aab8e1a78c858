package formats_test

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// piece is one callback of ReadBlocks or WriteBlocks: guest offset and
// length.
type piece struct{ pos, n int64 }

func TestReadBlocks(t *testing.T) {
	errBroken := errors.New("broken")
	for _, c := range []struct {
		name             string
		off, size, block int64
		len              int
		serve            int64 // the callback fills at most this much (0: all)
		failAt           int64 // the callback fails at this offset (-1: never)
		wantN            int
		wantErr          error
		wantPieces       []piece
	}{
		{name: "within a block", off: 10, size: 100, block: 32, len: 5, failAt: -1,
			wantN: 5, wantPieces: []piece{{10, 5}}},
		{name: "split at blocks", off: 30, size: 100, block: 32, len: 40, failAt: -1,
			wantN: 40, wantPieces: []piece{{30, 2}, {32, 32}, {64, 6}}},
		{name: "clipped at size", off: 90, size: 100, block: 32, len: 20, failAt: -1,
			wantN: 10, wantErr: io.EOF, wantPieces: []piece{{90, 6}, {96, 4}}},
		{name: "at size", off: 100, size: 100, block: 32, len: 1, failAt: -1, wantErr: io.EOF},
		{name: "empty", off: 0, size: 100, block: 32, len: 0, failAt: -1},
		{name: "negative", off: -1, size: 100, block: 32, len: 1, failAt: -1, wantErr: syscall.EIO},
		{name: "no split", off: 3, size: 100, block: 0, len: 90, failAt: -1,
			wantN: 90, wantPieces: []piece{{3, 90}}},
		{name: "callback serves less", off: 3, size: 100, block: 0, len: 50, serve: 20, failAt: -1,
			wantN: 50, wantPieces: []piece{{3, 50}, {23, 30}, {43, 10}}},
		{name: "error keeps whole pieces", off: 0, size: 100, block: 32, len: 100, failAt: 64,
			wantN: 64, wantErr: errBroken, wantPieces: []piece{{0, 32}, {32, 32}, {64, 32}}},
		{name: "no progress", off: 0, size: 100, block: 32, len: 10, serve: -1, failAt: -1,
			wantErr: io.ErrNoProgress, wantPieces: []piece{{0, 10}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var pieces []piece
			p := make([]byte, c.len)
			n, err := formats.ReadBlocks("img", p, c.off, c.size, c.block, func(q []byte, pos int64) (int, error) {
				pieces = append(pieces, piece{pos, int64(len(q))})
				if pos == c.failAt {
					return 0, errBroken
				}
				if c.serve != 0 {
					q = q[:max(min(int64(len(q)), c.serve), 0)]
				}
				for i := range q {
					q[i] = byte(pos + int64(i))
				}
				return len(q), nil
			})
			if n != c.wantN || !errors.Is(err, c.wantErr) || c.wantErr == nil && err != nil {
				t.Fatalf("got %d, %v; want %d, %v", n, err, c.wantN, c.wantErr)
			}
			if !slices.Equal(pieces, c.wantPieces) {
				t.Fatalf("pieces %v, want %v", pieces, c.wantPieces)
			}
			for i := range n {
				if p[i] != byte(c.off+int64(i)) {
					t.Fatalf("byte %d is %d, want %d", i, p[i], byte(c.off+int64(i)))
				}
			}
		})
	}
}

func TestWriteBlocks(t *testing.T) {
	errBroken := errors.New("broken")
	for _, c := range []struct {
		name             string
		off, size, block int64
		len              int
		failAt           int64
		wantN            int
		wantErr          error
		wantPieces       []piece
	}{
		{name: "split at blocks", off: 30, size: 100, block: 32, len: 40, failAt: -1,
			wantN: 40, wantPieces: []piece{{30, 2}, {32, 32}, {64, 6}}},
		{name: "up to size", off: 90, size: 100, block: 32, len: 10, failAt: -1,
			wantN: 10, wantPieces: []piece{{90, 6}, {96, 4}}},
		{name: "past size", off: 90, size: 100, block: 32, len: 11, failAt: -1, wantErr: syscall.EIO},
		{name: "negative", off: -1, size: 100, block: 32, len: 1, failAt: -1, wantErr: syscall.EIO},
		{name: "empty at size", off: 100, size: 100, block: 32, len: 0, failAt: -1},
		{name: "no split", off: 3, size: 100, block: 0, len: 90, failAt: -1,
			wantN: 90, wantPieces: []piece{{3, 90}}},
		{name: "error keeps whole pieces", off: 0, size: 100, block: 32, len: 100, failAt: 64,
			wantN: 64, wantErr: errBroken, wantPieces: []piece{{0, 32}, {32, 32}, {64, 32}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var pieces []piece
			n, err := formats.WriteBlocks("img", make([]byte, c.len), c.off, c.size, c.block, func(q []byte, pos int64) error {
				pieces = append(pieces, piece{pos, int64(len(q))})
				if pos == c.failAt {
					return errBroken
				}
				return nil
			})
			if n != c.wantN || !errors.Is(err, c.wantErr) || c.wantErr == nil && err != nil {
				t.Fatalf("got %d, %v; want %d, %v", n, err, c.wantN, c.wantErr)
			}
			if !slices.Equal(pieces, c.wantPieces) {
				t.Fatalf("pieces %v, want %v", pieces, c.wantPieces)
			}
		})
	}
}

// The errors name the image and the offending values.
func TestBlocksErrorText(t *testing.T) {
	_, rerr := formats.ReadBlocks("a.img", nil, -5, 100, 32, nil)
	_, werr := formats.WriteBlocks("a.img", make([]byte, 8), 96, 100, 32, nil)
	for _, c := range []struct {
		err  error
		want string
	}{
		{rerr, "a.img: read at negative offset -5: Input/output error"},
		{werr, "a.img: write of 8 bytes at offset 96 outside the image (100 bytes): Input/output error"},
	} {
		if got := fmt.Sprint(c.err); got != c.want {
			t.Errorf("error %q, want %q", got, c.want)
		}
	}
}

func TestMappedRun(t *testing.T) {
	// Blocks of 4: 0 -> 100, 1 -> 104 (contiguous), 2 -> 200, 3 and 4
	// unallocated, 5 -> 300.
	hosts := map[int64]int64{0: 100, 1: 104, 2: 200, 5: 300}
	hostOffset := func(off int64) int64 {
		if h, ok := hosts[off/4]; ok {
			return h + off%4
		}
		return -1
	}
	for _, tc := range []struct{ off, length, host, n int64 }{
		{0, 24, 100, 8}, // blocks 0 and 1 merge, 2 is elsewhere
		{2, 24, 102, 6}, // starting inside a block
		{8, 24, 200, 4}, // block 2 alone
		{12, 24, -1, 8}, // the unallocated blocks 3 and 4
		{13, 2, -1, 2},  // clipped by length
		{20, 4, 300, 4}, // the last block
		{0, 3, 100, 3},  // inside the first block
		{14, 10, -1, 6}, // unallocated up to block 5
	} {
		host, n := formats.MappedRun(tc.off, tc.length, 4, hostOffset)
		if host != tc.host || n != tc.n {
			t.Errorf("MappedRun(%d, %d) = %d, %d; want %d, %d", tc.off, tc.length, host, n, tc.host, tc.n)
		}
	}
}
