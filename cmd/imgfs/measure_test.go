package main

import "testing"

func TestMeasureMatchesQemu(t *testing.T) {
	buildFixtures(t, append(reportFixtures(),
		qimg("snapshot", "-c", "s1", "v2.qcow2"),
	))
	for _, img := range []string{"raw.img", "empty.qcow2", "v2.qcow2", "c512.qcow2", "compressed.qcow2",
		"zero.qcow2", "l2ext.qcow2", "top.qcow2", "short-top.qcow2", "bitmaps.qcow2", "prealloc-meta.qcow2"} {
		sameAsQemu(t, "measure", img)
		sameAsQemu(t, "measure", "-O", "qcow2", img)
		sameAsQemu(t, "measure", "-O", "qcow2", "--output=json", "-o", "cluster_size=4k", img)
	}
	for _, args := range [][]string{
		{"measure", "--size", "1G"},
		{"measure", "--size", "1000", "--output=json"},
		{"measure", "-O", "qcow2", "--size", "1G"},
		{"measure", "-O", "qcow2", "--size", "0", "--output=json"},
		{"measure", "-O", "qcow2", "--size", "1P", "-o", "extended_l2=on"},
		{"measure", "-O", "qcow2", "--size", "1G", "-o", "cluster_size=512", "-o", "refcount_bits=64"},
		{"measure", "-O", "qcow2", "--size", "1G", "-o", "preallocation=full"},
		{"measure", "-O", "qcow2", "--size", "1G", "-o", "size=2G"},
		{"measure", "-O", "qcow2", "-o", "backing_file=x", "top.qcow2"},
		{"measure", "-O", "raw", "-o", "preallocation=full", "top.qcow2"},
		{"measure", "-f", "qcow2", "-U", "--output=human", "top.qcow2"},
		{"measure", "--image-opts", "driver=qcow2,file.filename=top.qcow2"},
		// Errors, in img_measure's order.
		{"measure"},
		{"measure", "a", "b"},
		{"measure", "-f", "qcow2"},
		{"measure", "-l", "s1"},
		{"measure", "--image-opts", "--size", "1G"},
		{"measure", "--size", "1G", "top.qcow2"},
		{"measure", "--size", "-1"},
		{"measure", "--size", "8E"},
		{"measure", "--size", "1G", "--output=xml"},
		{"measure", "-O", "qcow2", "-o", "size=1G"},
		{"measure", "-O", "bogus", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", ",,", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "bogus=1", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "size=1x", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "help", "top.qcow2"},
		{"measure", "-O", "raw", "-o", "cluster_size=4k", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "compat=v3", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1", "--size", "1G"},
		{"measure", "-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"},
		{"measure", "-O", "qcow2", "--size", "4E"},
		{"measure", "-l", "snapshot.bogus=1", "v2.qcow2"},
		{"measure", "nope"},
	} {
		sameAsQemu(t, args...)
	}
}
