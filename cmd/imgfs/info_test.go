package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestInfoMatchesQemu(t *testing.T) {
	buildFixtures(t, reportFixtures())
	for _, img := range reportImages {
		for _, extra := range [][]string{nil, {"--output=json"}, {"--backing-chain"}, {"--output", "json", "--backing-chain"}} {
			sameAsQemu(t, append(append([]string{"info"}, extra...), img)...)
		}
	}
	sameAsQemu(t, "info", "-f", "raw", "top.qcow2")
	sameAsQemu(t, "info", "-U", "--output=human", "top.qcow2")
	sameAsQemu(t, "info", "--image-opts", "--output=json", "driver=qcow2,file.filename=snap.qcow2")
	sameAsQemu(t, "info", "--image-opts", "--backing-chain", "driver=qcow2,file.filename=top.qcow2")
}

// A chain that loops back to its top is refused after the open.
func TestInfoBackingLoopMatchesQemu(t *testing.T) {
	buildFixtures(t, []fixture{
		qimg("create", "-q", "-f", "qcow2", "a.qcow2", "1M"),
		qimg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"),
		qimg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "-u", "orphan.qcow2", "1M"),
	})
	sameAsQemu(t, "info", "--backing-chain", "b.qcow2")
	sameAsQemu(t, "info", "b.qcow2")
	sameAsQemu(t, "info", "orphan.qcow2")
	sameAsQemu(t, "info", "--backing-chain", "orphan.qcow2")
}

// Backing names resolve against the directory of the image that names
// them; the outputs show both the stored and the resolved name.
func TestRelativePathsMatchQemu(t *testing.T) {
	dir := buildFixtures(t, []fixture{
		{fn: func(dir string) error { return os.Mkdir(filepath.Join(dir, "sub"), 0o755) }},
		qimg("create", "-q", "-f", "qcow2", "sub/base.qcow2", "4M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 64k", "sub/base.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "-b", "../sub/base.qcow2", "-F", "qcow2", "sub/dotdot.qcow2", "8M"),
	})
	abs := filepath.Join(dir, "sub", "top.qcow2")
	for _, args := range [][]string{
		{"info", "--backing-chain", "sub/top.qcow2"},
		{"info", "--backing-chain", "--output=json", abs},
		{"info", "--backing-chain", "sub/dotdot.qcow2"},
		{"map", "--output=json", "sub/dotdot.qcow2"},
		{"map", "sub/top.qcow2"},
		{"map", "--output=json", abs},
		{"compare", "sub/top.qcow2", "sub/base.qcow2"},
	} {
		sameAsQemu(t, args...)
	}
}
