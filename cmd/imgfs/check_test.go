package main

import (
	"os"
	"testing"
)

func TestCheckMatchesQemu(t *testing.T) {
	buildFixtures(t, reportFixtures())
	for _, img := range reportImages {
		sameAsQemu(t, "check", img)
		sameAsQemu(t, "check", "--output=json", img)
	}
	sameAsQemu(t, "check", "-q", "leaks.qcow2")
	sameAsQemu(t, "check", "-r", "bogus", "leaks.qcow2")
	sameAsQemu(t, "check", "--output=yaml", "leaks.qcow2")
	sameAsQemu(t, "check", "-U", "-f", "qcow2", "--output=human", "top.qcow2")
	sameAsQemu(t, "check", "--image-opts", "driver=qcow2,file.filename=leaks.qcow2")
}

// Repairs change the image, so each tool repairs its own copy.
func TestCheckRepairMatchesQemu(t *testing.T) {
	buildFixtures(t, reportFixtures())
	for _, tc := range []struct{ img, mode, output string }{
		{"leaks.qcow2", "leaks", "human"},
		{"leaks.qcow2", "all", "json"},
		{"corrupt.qcow2", "leaks", "human"},
		{"corrupt.qcow2", "all", "human"},
		{"corrupt.qcow2", "all", "json"},
		{"dirty.qcow2", "all", "human"},
		{"dirty.qcow2", "leaks", "json"},
	} {
		orig, err := os.ReadFile(tc.img)
		if err != nil {
			t.Fatal(err)
		}
		args := []string{"check", "-r", tc.mode, "--output=" + tc.output, "copy.qcow2"}
		if err := os.WriteFile("copy.qcow2", orig, 0o644); err != nil {
			t.Fatal(err)
		}
		want := runQemu(t, args...)
		wantAfter := runQemu(t, "check", "copy.qcow2")
		if err := os.WriteFile("copy.qcow2", orig, 0o644); err != nil {
			t.Fatal(err)
		}
		got := runImgfs(args...)
		gotAfter := runQemu(t, "check", "copy.qcow2")
		if want != got || wantAfter != gotAfter {
			t.Errorf("check -r %s %s:\nqemu-img: %+v\nthen: %+v\nimgfs: %+v\nthen: %+v", tc.mode, tc.img, want, wantAfter, got, gotAfter)
		}
	}
}
