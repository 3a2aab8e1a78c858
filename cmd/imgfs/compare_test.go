package main

import "testing"

func TestCompareMatchesQemu(t *testing.T) {
	steps := append(reportFixtures(),
		qimg("convert", "-O", "raw", "top.qcow2", "top.raw"),
		qimg("convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"),
		qimg("convert", "-O", "raw", "l2ext.qcow2", "l2ext.raw"),
		qimg("convert", "-O", "raw", "prealloc-meta.qcow2", "prealloc-meta.raw"),
		qimg("convert", "-O", "raw", "datafile.qcow2", "datafile.img"),
		qimg("convert", "-O", "raw", "zero.qcow2", "zero.raw"),
		qimg("create", "-q", "-f", "qcow2", "big.qcow2", "32M"),
		qimg("create", "-q", "-f", "raw", "small.raw", "8M"),
		qimg("create", "-q", "-f", "qcow2", "tail.qcow2", "32M"),
		qio("-f", "qcow2", "-c", "write -P 9 20M 512", "tail.qcow2"),
		qimg("create", "-q", "-f", "qcow2", "prog.qcow2", "100M"),
		qio("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 30M 1M", "-c", "write -P 3 77M 3M", "prog.qcow2"),
	)
	buildFixtures(t, steps)
	for _, args := range [][]string{
		{"top.qcow2", "top.raw"},
		{"top.qcow2", "flat.qcow2"},
		{"-f", "qcow2", "-F", "raw", "top.qcow2", "top.raw"},
		{"top.qcow2", "mid.qcow2"},
		{"l2ext.qcow2", "l2ext.raw"},
		{"-s", "l2ext.qcow2", "l2ext.qcow2"},
		{"prealloc-meta.qcow2", "prealloc-meta.raw"},
		{"-s", "prealloc-meta.qcow2", "v2.qcow2"},
		{"datafile.qcow2", "datafile.img"},
		{"datafile-raw.qcow2", "datafile.img"},
		{"zero.qcow2", "zero.raw"},
		{"-s", "zero.qcow2", "zero.qcow2"},
		{"-s", "src.qcow2", "compressed.qcow2"},
		{"snap.qcow2", "v2.qcow2"},
		{"base.qcow2", "mid.qcow2"},
		{"src.qcow2", "compressed.qcow2"},
		{"empty.qcow2", "big.qcow2"},
		{"big.qcow2", "small.raw"},
		{"small.raw", "tail.qcow2"},
		{"tail.qcow2", "small.raw"},
		{"short-top.qcow2", "base.qcow2"},
		{"-s", "big.qcow2", "small.raw"},
		{"-s", "top.qcow2", "flat.qcow2"},
		{"-s", "top.qcow2", "top.qcow2"},
		{"-s", "short-top.qcow2", "short-top.qcow2"},
		{"-q", "top.qcow2", "mid.qcow2"},
		{"-p", "prog.qcow2", "prog.qcow2"},
		{"-p", "big.qcow2", "small.raw"},
		{"-p", "-q", "prog.qcow2", "prog.qcow2"},
		{"-U", "-T", "writeback", "top.qcow2", "top.raw"},
		{"-p", "-T", "bogus", "top.qcow2", "top.raw"},
		{"-p", "top.qcow2", "nope"},
		{"top.qcow2"},
		{"--object", "foo", "top.qcow2", "top.raw"},
		{"--image-opts", "driver=qcow2,file.filename=top.qcow2", "driver=raw,file.filename=top.raw"},
	} {
		sameAsQemu(t, append([]string{"compare"}, args...)...)
	}
}
