package luks

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/formats"
)

// TestResize checks Resize's own rules on a 64 KiB image: the file is
// the payload offset plus exactly the new size, the virtual size is that
// rounded up to a sector, and refusals leave both alone.
func TestResize(t *testing.T) {
	const size = 64 << 10
	tests := []struct {
		name     string
		readOnly bool
		to       int64
		prealloc string
		shrink   bool
		wantSize int64 // virtual size after; the file is payload+to
		wantErr  error
	}{
		{name: "grow", to: 128 << 10, wantSize: 128 << 10},
		{name: "grow unaligned", to: size + 1, wantSize: size + 512},
		{name: "grow falloc", to: 128 << 10, prealloc: "falloc", wantSize: 128 << 10},
		{name: "grow full", to: size + 700, prealloc: "full", wantSize: size + 1024},
		{name: "same size", to: size, wantSize: size},
		{name: "shrink", to: 1000, shrink: true, wantSize: 1024},
		{name: "shrink to nothing", to: 0, shrink: true, wantSize: 0},
		{name: "shrink without the flag", to: 1000, wantErr: formats.ErrInvalidOption},
		{name: "metadata", to: 128 << 10, prealloc: "metadata", wantErr: formats.ErrUnsupported},
		{name: "negative", to: -512, shrink: true, wantErr: syscall.EFBIG},
		{name: "read-only", readOnly: true, to: 128 << 10, wantErr: formats.ErrReadOnly},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := newImage(t, "", size)
			before, err := os.Stat(name)
			if err != nil {
				t.Fatal(err)
			}
			img := openLUKS(t, name, tc.readOnly)
			defer img.Close()
			l := img.(*Image)
			err = l.Resize(tc.to, tc.prealloc, tc.shrink)
			wantFile := l.payload + tc.to
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Resize: %v, want %v", err, tc.wantErr)
				}
				tc.wantSize, wantFile = size, before.Size()
			} else if err != nil {
				t.Fatalf("Resize: %v", err)
			}
			if got := img.Size(); got != tc.wantSize {
				t.Errorf("Size() = %d, want %d", got, tc.wantSize)
			}
			st, err := os.Stat(name)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != wantFile {
				t.Errorf("file size %d, want %d", st.Size(), wantFile)
			}
			if tc.wantErr == nil && tc.to > 0 {
				// The new last byte is readable and writable.
				if _, err := img.WriteAt([]byte{7}, tc.wantSize-1); err != nil {
					t.Errorf("write of the last byte: %v", err)
				}
			}
		})
	}
}
