package control

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
)

func TestDD(t *testing.T) {
	src := newMemImage("src", 10000)
	pattern := make([]byte, 10000)
	for i := range pattern {
		pattern[i] = byte(i * 7)
	}
	src.fill(0, pattern)
	for i, tc := range []struct {
		bs, count, skip    int64
		hasCount, hasSkip  bool
		wantFrom, wantSize int64
		warn               string
	}{
		{bs: 512, wantSize: 10000},
		{bs: 1000, count: 3, hasCount: true, wantSize: 3000},
		// count limits the input counted from its start, skipped blocks
		// included.
		{bs: 1000, count: 3, hasCount: true, skip: 1, hasSkip: true, wantFrom: 1000, wantSize: 2000},
		{bs: 3000, skip: 3, hasSkip: true, wantFrom: 9000, wantSize: 1000},
		{bs: 1 << 20, wantSize: 10000},
		{bs: 100, count: 1 << 62, hasCount: true, wantSize: 10000},
		{bs: 512, count: 0, hasCount: true, wantSize: 0},
		{bs: 1000, skip: 11, hasSkip: true, wantSize: 0, warn: "if.img: cannot skip to specified offset"},
		{bs: 1 << 30, skip: 1 << 40, hasSkip: true, wantSize: 0, warn: "if.img: cannot skip to specified offset"},
	} {
		target := filepath.Join(t.TempDir(), "out")
		var warned string
		err := DD(context.Background(), DDOptions{
			Source: src, SourceName: "if.img", Target: target, TargetFormat: "memtest",
			BlockSize: tc.bs, Count: tc.count, HasCount: tc.hasCount, Skip: tc.skip, HasSkip: tc.hasSkip,
			Warn: func(msg string) { warned = msg },
		})
		if err != nil {
			t.Errorf("case %d: %v", i, err)
			continue
		}
		out := memLookup(target)
		if out.Size() != tc.wantSize || !bytes.Equal(out.data, pattern[tc.wantFrom:tc.wantFrom+tc.wantSize]) || warned != tc.warn {
			t.Errorf("case %d: target of %d bytes (want %d from %d), warning %q (want %q)",
				i, out.Size(), tc.wantSize, tc.wantFrom, warned, tc.warn)
		}
	}
}

func TestDDErrors(t *testing.T) {
	src := newMemImage("src", 4096)
	for _, tc := range []struct{ format, want string }{
		{"bogus", "Unknown file format"},
	} {
		err := DD(context.Background(), DDOptions{Source: src, Target: filepath.Join(t.TempDir(), "out"), TargetFormat: tc.format})
		if err == nil || err.Error() != tc.want {
			t.Errorf("format %s: error %v, want %q", tc.format, err, tc.want)
		}
	}
	src.failReadAt = 1024
	err := DD(context.Background(), DDOptions{Source: src, Target: filepath.Join(t.TempDir(), "out"), TargetFormat: "memtest"})
	if want := "error while reading from input image file: Input/output error"; err == nil || err.Error() != want {
		t.Errorf("failed read: error %v, want %q", err, want)
	}
}
