package main

import "testing"

func TestMapMatchesQemu(t *testing.T) {
	buildFixtures(t, reportFixtures())
	for _, img := range reportImages {
		if img == "corrupt.qcow2" {
			continue // reading it is refused by both, with different words
		}
		sameAsQemu(t, "map", img)
		sameAsQemu(t, "map", "--output=json", img)
	}
	for _, args := range [][]string{
		{"map", "--start-offset=65536", "--max-length=1M", "top.qcow2"},
		{"map", "-s", "100", "--output=json", "top.qcow2"},
		{"map", "--start-offset=1G", "--output=json", "top.qcow2"},
		{"map", "--start-offset=1G", "top.qcow2"},
		{"map", "--max-length=0", "--output=json", "top.qcow2"},
		{"map", "-l", "1.5k", "--output=json", "top.qcow2"},
		{"map", "--start-offset=-1", "top.qcow2"},
		{"map", "--start-offset=1x", "top.qcow2"},
		{"map", "--start-offset=8E", "top.qcow2"},
		{"map", "--max-length=9E", "top.qcow2"},
		{"map", "--output=yaml", "top.qcow2"},
		{"map", "-f", "raw", "top.qcow2"},
		{"map"},
	} {
		sameAsQemu(t, args...)
	}
}
