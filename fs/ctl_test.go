package fs

import (
	"encoding/json"
	"errors"
	"reflect"
	"syscall"
	"testing"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func TestParseCtl(t *testing.T) {
	tests := []struct {
		line     string
		cmd      string
		opts     []ctlOpt
		operands []string
		bad      bool
	}{
		{line: "resize +1G\n", cmd: "resize", operands: []string{"+1G"}},
		{line: "resize --shrink -1G", cmd: "resize", opts: []ctlOpt{{"--shrink", ""}}, operands: []string{"-1G"}},
		{line: "resize", bad: true},
		{line: "commit -b base.qcow2", cmd: "commit", opts: []ctlOpt{{"-b", "base.qcow2"}}},
		{line: "commit -d", cmd: "commit", opts: []ctlOpt{{"-d", ""}}},
		{line: "commit -b", bad: true},
		{line: "rebase -u -b b.qcow2 -F qcow2", cmd: "rebase",
			opts: []ctlOpt{{"-u", ""}, {"-b", "b.qcow2"}, {"-F", "qcow2"}}},
		{line: "snapshot -c s1", cmd: "snapshot", opts: []ctlOpt{{"-c", "s1"}}},
		{line: "convert out.raw -O raw", cmd: "convert", opts: []ctlOpt{{"-O", "raw"}}, operands: []string{"out.raw"}},
		{line: "convert -O raw -- -x", cmd: "convert", opts: []ctlOpt{{"-O", "raw"}}, operands: []string{"-x"}},
		{line: "bitmap --add --merge b0 -g 64k b1", cmd: "bitmap",
			opts: []ctlOpt{{"--add", ""}, {"--merge", "b0"}, {"-g", "64k"}}, operands: []string{"b1"}},
		{line: "check -r all", cmd: "check", opts: []ctlOpt{{"-r", "all"}}},
		{line: "amend -o compat=0.10 --force", cmd: "amend", opts: []ctlOpt{{"-o", "compat=0.10"}, {"--force", ""}}},
		{line: "", bad: true},
		{line: "frobnicate", bad: true},
		{line: "commit -x", bad: true},
		{line: "snapshot -l", bad: true},
		{line: "resize +1M\nresize +1M\n", bad: true},
		{line: "resize +1M\r\n", cmd: "resize", operands: []string{"+1M"}},
	}
	for _, tt := range tests {
		l, err := parseCtl(tt.line)
		if tt.bad {
			if !errors.Is(err, errUsage) {
				t.Errorf("parseCtl(%q) = %+v, %v; want a usage error", tt.line, l, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseCtl(%q): %v", tt.line, err)
			continue
		}
		want := &ctlLine{cmd: tt.cmd, opts: tt.opts, operands: tt.operands}
		if !reflect.DeepEqual(l, want) {
			t.Errorf("parseCtl(%q) = %+v, want %+v", tt.line, l, want)
		}
	}
}

func TestRateLimit(t *testing.T) {
	for _, tt := range []struct {
		line string
		want int64
		ok   bool
	}{
		{"commit", 0, true},
		{"commit -r 1M", 1 << 20, true},
		{"convert -r 512k -O raw x", 512 << 10, true},
		{"commit -r fast", 0, false},
		{"commit -r -1", 0, false},
	} {
		l, err := parseCtl(tt.line)
		if err != nil {
			t.Fatal(err)
		}
		got, err := l.rateLimit()
		if (err == nil) != tt.ok || got != tt.want || (err != nil && !errors.Is(err, errUsage)) {
			t.Errorf("%q: rateLimit() = %d, %v; want %d, ok=%v", tt.line, got, err, tt.want, tt.ok)
		}
	}
}

func TestWantOperands(t *testing.T) {
	for _, tt := range []struct {
		line string
		n    int
		ok   bool
	}{
		{"resize +1M", 1, true},
		{"resize a b +1M", 1, false},
		{"convert -O raw", 1, false},
		{"convert -O raw x", 1, true},
		{"commit x", 0, false},
	} {
		l, err := parseCtl(tt.line)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.wantOperands(tt.n, "x"); (err == nil) != tt.ok || (err != nil && !errors.Is(err, errUsage)) {
			t.Errorf("%q: wantOperands(%d) = %v, want ok=%v", tt.line, tt.n, err, tt.ok)
		}
	}
}

func TestCtlErrno(t *testing.T) {
	tests := []struct {
		err  error
		want syscall.Errno
	}{
		{usagef("unknown command '%s'", "x"), syscall.EINVAL},
		{control.ErrShrinkRefused, syscall.EINVAL},
		{errOpen, syscall.EBUSY},
		{formats.Errorf(formats.ErrReadOnly, "a is read-only"), syscall.EROFS},
	}
	for _, tt := range tests {
		if got := Errno(tt.err); got != tt.want {
			t.Errorf("Errno(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestOpStateText(t *testing.T) {
	var s opState
	check := func(want statusDoc) {
		t.Helper()
		var got statusDoc
		if err := json.Unmarshal(s.text(), &got); err != nil {
			t.Fatalf("status %q: %v", s.text(), err)
		}
		if got != want {
			t.Errorf("status = %+v, want %+v", got, want)
		}
	}
	check(statusDoc{State: "idle", Progress: "0.00"})
	s.begin("commit")
	s.progress()(1, 3)
	check(statusDoc{Operation: "commit", State: stateRunning, Progress: "33.33"})
	s.end(nil)
	check(statusDoc{Operation: "commit", State: stateDone, Progress: "100.00"})
	s.begin("resize")
	s.addPercent(25)
	s.end(errors.New("Use the --shrink option"))
	check(statusDoc{Operation: "resize", State: stateFailed, Progress: "25.00", Error: "Use the --shrink option"})
}

func TestSnapshotEntries(t *testing.T) {
	list := []formats.Snapshot{
		{ID: "1", Name: "b"},
		{ID: "2", Name: ""},
		{ID: "3", Name: "a/x"},
		{ID: "4", Name: "b"},
		{ID: "5", Name: ".."},
		{ID: "6", Name: "a"},
	}
	var got []string
	for _, e := range snapshotEntries(list) {
		got = append(got, e.name+"="+e.snap.ID)
	}
	want := []string{"2=2", "3=3", "5=5", "a=6", "b=1"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("entries = %v, want %v", got, want)
	}
}
