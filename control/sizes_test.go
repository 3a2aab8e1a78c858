package control

import "testing"

func TestSizeToStr(t *testing.T) {
	tests := []struct {
		in   uint64
		want string
	}{
		{0, "0 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{200704, "196 KiB"},
		{1023999, "1e+03 KiB"},
		{1 << 30, "1 GiB"},
		{10 << 20, "10 MiB"},
		{1 << 40 * 1000 / 1024 * 1000, "977 TiB"},
		{1000 << 40, "0.977 PiB"},
		{1<<64 - 1, "16 EiB"},
	}
	for _, tc := range tests {
		if got := SizeToStr(tc.in); got != tc.want {
			t.Errorf("SizeToStr(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
