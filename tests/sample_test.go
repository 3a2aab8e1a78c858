package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// sampleDir holds the shipped sample images, relative to this package.
const sampleDir = "../testdata/sample"

// sampleImages are the images scripts/make-sample.sh makes.
var sampleImages = []string{"base.qcow2", "disk.qcow2", "compressed.qcow2"}

// TestSampleRecipe reruns the recipe of testdata/sample and requires the
// committed images to be byte-identical to what it makes, so the README's
// account of how they were made stays true.
func TestSampleRecipe(t *testing.T) {
	dir := t.TempDir()
	mustRun(t, "..", "/bin/bash", "scripts/make-sample.sh", dir)
	for _, name := range sampleImages {
		want, err1 := os.ReadFile(filepath.Join(dir, name))
		got, err2 := os.ReadFile(filepath.Join(sampleDir, name))
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if !bytes.Equal(want, got) {
			t.Errorf("testdata/sample/%s differs from what scripts/make-sample.sh makes (first difference at byte %d)",
				name, firstByteDiff(want, got))
		}
	}
}

// TestSampleDemo holds the commands `make demo` runs on the samples to
// qemu-img's output, on a copy so that nothing can change the committed
// files.
func TestSampleDemo(t *testing.T) {
	dir := t.TempDir()
	copyDir(t, sampleDir, dir)
	for _, name := range sampleImages {
		cmds := append(append([][]string{}, inspectCommands...), chainCommands...)
		for _, cmd := range cmds {
			t.Run(testName(append(cmd, name)), func(t *testing.T) {
				differential(t, dir, append(cmd, name)...)
			})
		}
		t.Run("convert-qcow2-compressed_"+name, func(t *testing.T) {
			checkConvertQcow2(t, dir, imageCase{name: name, image: name}, true)
		})
	}
}
