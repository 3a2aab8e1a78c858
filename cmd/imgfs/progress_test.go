package main

import (
	"bytes"
	"flag"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/urfave/cli/v2"
)

func progressContext(stdout, stderr *bytes.Buffer) *cli.Context {
	return cli.NewContext(&cli.App{Writer: stdout, ErrWriter: stderr}, flag.NewFlagSet("t", flag.ContinueOnError), nil)
}

func TestProgressBarSteps(t *testing.T) {
	tests := []struct {
		name    string
		minSkip float32
		reports [][2]int64 // done, total
		want    string
	}{
		// Convert's step is 1%: 0.5% does not redraw, 1.5% does.
		{"convert", 1, [][2]int64{{5, 1000}, {15, 1000}, {16, 1000}, {1000, 1000}},
			"    (0.00/100%)\r    (1.50/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"},
		// Values print as C's %3.2f does, ties to even.
		{"rounding", 1, [][2]int64{{1, 32}, {3, 32}, {5, 32}},
			"    (0.00/100%)\r    (3.12/100%)\r    (9.38/100%)\r    (15.62/100%)\r    (100.00/100%)\r\n"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		p := newProgressBar(progressContext(&out, &errb), true, tt.minSkip)
		p.print(0, 100)
		report := p.fraction()
		for _, r := range tt.reports {
			report(r[0], r[1])
		}
		p.print(100, 0)
		p.end()
		if out.String() != tt.want || errb.Len() != 0 {
			t.Errorf("%s: stdout %q, stderr %q; want stdout %q", tt.name, out.String(), errb.String(), tt.want)
		}
	}
}

func TestProgressBarChunks(t *testing.T) {
	var out, errb bytes.Buffer
	p := newProgressBar(progressContext(&out, &errb), true, 2)
	report := p.chunks()
	for done := int64(1); done <= 4; done++ {
		report(done, 4)
	}
	p.end()
	if want := "    (25.00/100%)\r    (50.00/100%)\r    (75.00/100%)\r    (100.00/100%)\r\n"; out.String() != want {
		t.Errorf("got %q, want %q", out.String(), want)
	}
}

// Without -p nothing is drawn, but SIGUSR1 makes the next redraw go to
// stderr once.
func TestProgressBarSIGUSR1(t *testing.T) {
	var out, errb bytes.Buffer
	p := newProgressBar(progressContext(&out, &errb), false, 1)
	defer p.end()
	report := p.fraction()
	report(10, 100)
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !p.pending.Load(); {
		if time.Now().After(deadline) {
			t.Fatal("SIGUSR1 not seen")
		}
		time.Sleep(time.Millisecond)
	}
	report(10, 100) // no move: nothing printed yet
	report(20, 100)
	report(30, 100)
	if out.Len() != 0 || errb.String() != "    (20.00/100%)\n" {
		t.Errorf("stdout %q, stderr %q", out.String(), errb.String())
	}
	if strings.Count(errb.String(), "\n") != 1 {
		t.Error("printed more than once per signal")
	}
}
