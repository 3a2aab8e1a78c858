package main

import (
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// timing is the one part of bench's output that differs between runs.
var timing = regexp.MustCompile(`in [0-9]+\.[0-9]{3} seconds`)

func TestBenchMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "q.qcow2", "64M"),
		qimg("create", "-q", "-f", "raw", "r.raw", "4M"),
	})
	for _, args := range [][]string{
		{"bench", "-c", "100", "q.qcow2"},
		{"bench", "-c", "100", "-d", "4", "-w", "--pattern=0xab", "q.qcow2"},
		{"bench", "-c", "100", "-w", "--flush-interval=10", "-d", "4", "q.qcow2"},
		{"bench", "-c", "100", "-w", "--flush-interval=10", "-d", "4", "--no-drain", "q.qcow2"},
		{"bench", "-c", "0", "q.qcow2"},
		{"bench", "-c", "0x10", "-d", "010", "q.qcow2"},
		{"bench", "-c", "10", "-s", "64k", "-S", "1M", "-o", "1M", "q.qcow2"},
		{"bench", "-c", "10", "-S", "0", "-s", "0", "q.qcow2"},
		{"bench", "-c", "10", "-o", "1.5k", "-q", "q.qcow2"},
		{"bench", "-c", "2000", "-s", "1000", "-S", "3000", "-d", "16", "-w", "--flush-interval", "100", "-f", "raw", "r.raw"},
		{"bench", "-c", "10", "-w", "r.raw"},
		{"bench", "-c", "10", "-t", "none", "-n", "q.qcow2"},
		{"bench", "-c", "10", "-i", "native", "-t", "directsync", "-w", "q.qcow2"},
		{"bench", "-c", "10", "-i", "io_uring", "-t", "writethrough", "-w", "q.qcow2"},
		{"bench", "-c", "10", "-i", "threads", "-U", "q.qcow2"},
		{"bench", "-c", "10", "--image-opts", "driver=qcow2,file.filename=q.qcow2"},
		{"bench", "-c", "10", "-o", "100M", "q.qcow2"},
		{"bench", "-c", "10", "-o", "63M", "-s", "2M", "q.qcow2"},
		// Errors.
		{"bench"},
		{"bench", "a", "b"},
		{"bench", "-c", "abc", "q.qcow2"},
		{"bench", "-c", "-1", "q.qcow2"},
		{"bench", "-c", "1k", "q.qcow2"},
		{"bench", "-c", "3000000000", "q.qcow2"},
		{"bench", "-c", "08", "q.qcow2"},
		{"bench", "-d", "x", "q.qcow2"},
		{"bench", "-s", "1x", "q.qcow2"},
		{"bench", "-s", "3G", "q.qcow2"},
		{"bench", "-S", "1x", "q.qcow2"},
		{"bench", "-S", "3G", "q.qcow2"},
		{"bench", "-o", "-1", "q.qcow2"},
		{"bench", "--pattern=256", "q.qcow2"},
		{"bench", "--flush-interval=x", "q.qcow2"},
		{"bench", "-c", "100", "--flush-interval=10", "q.qcow2"},
		{"bench", "-c", "100", "-w", "--flush-interval=2", "-d", "4", "q.qcow2"},
		{"bench", "-t", "bogus", "q.qcow2"},
		{"bench", "-i", "bogus", "q.qcow2"},
		{"bench", "-c", "10", "-i", "native", "q.qcow2"},
		{"bench", "-c", "10", "-n", "q.qcow2"},
		{"bench", "-n", "nope"},
		{"bench", "--object", "secret,id=s,data=x", "q.qcow2"},
	} {
		want := runQemu(t, args...)
		got := runImgfs(args...)
		want.stdout = timing.ReplaceAllString(want.stdout, "in T seconds")
		got.stdout = timing.ReplaceAllString(got.stdout, "in T seconds")
		if want != got {
			t.Errorf("%v:\nqemu-img: %+v\nimgfs:    %+v", args, want, got)
		}
	}
}

// Writes land where qemu-img's would: -o, -S and the wrap at the end.
func TestBenchWritesPattern(t *testing.T) {
	buildFixtures(t, []fixture{qimg("create", "-q", "-f", "qcow2", "q.qcow2", "1M")})
	if r := runImgfs("bench", "-w", "-c", "6", "-d", "3", "-s", "64k", "-S", "320k", "-o", "128k", "--pattern=7", "q.qcow2"); r.code != 0 {
		t.Fatalf("bench: %+v", r)
	}
	// 128k, 448k, 768k, then 1088k wraps to 64k, 384k, 704k.
	for _, off := range []string{"64k", "128k", "384k", "448k", "704k", "768k"} {
		if out := verifyPattern(t, 7, off, "64k"); out != "" {
			t.Errorf("pattern 7 missing at %s: %s", off, out)
		}
	}
	for _, r := range [][2]string{{"0", "64k"}, {"192k", "192k"}, {"512k", "192k"}, {"832k", "192k"}} {
		if out := verifyPattern(t, 0, r[0], r[1]); out != "" {
			t.Errorf("unwritten range at %s changed: %s", r[0], out)
		}
	}
}

// verifyPattern reads q.qcow2 with qemu-io and returns its output when
// the range does not hold pattern bytes, else "".
func verifyPattern(t *testing.T, pattern int, off, length string) string {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("read -P %d %s %s", pattern, off, length), "q.qcow2").CombinedOutput()
	if err != nil || strings.Contains(string(out), "verification failed") {
		return fmt.Sprintf("%v: %s", err, out)
	}
	return ""
}
