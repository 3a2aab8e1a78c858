package tests

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFUSEReadAhead checks that a mount raises its readahead from the
// kernel's 128 KiB for FUSE to 1 MiB, or to what -o read_ahead_kb says:
// sequential readers of the files read through the page cache (convert-to/
// outputs, snapshots/ views) depend on it.
func TestFUSEReadAhead(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	for _, tc := range []struct {
		opts []string
		want string
	}{{nil, "1024"}, {[]string{"ro", "read_ahead_kb=512"}, "512"}} {
		mnt := mountImgfs(t, src, tc.opts...)
		var st unix.Stat_t
		if err := unix.Stat(mnt, &st); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev)))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != tc.want {
			t.Errorf("mount -o %v: read_ahead_kb %s, want %s", tc.opts, got, tc.want)
		}
	}
}
