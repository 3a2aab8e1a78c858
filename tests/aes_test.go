package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// Legacy AES encryption (qcow and qcow2 crypt_method 1), which qemu-img
// 7.2 creates, reads and writes without a warning: every command line
// must behave as qemu-img's, and every file it makes or changes must be
// byte for byte qemu-img's.

// aesSecret is the passphrase object of the AES fixtures.
const aesSecret = "secret,id=s,data=x"

// aesOpts is the --image-opts string that unlocks an AES fixture.
func aesOpts(driver, file string) string {
	return "driver=" + driver + ",encrypt.key-secret=s,file.filename=" + file
}

// qemuIOAES runs qemu-io commands on an AES image.
func qemuIOAES(driver, file string, ops ...string) step {
	return func(t testing.TB, dir string) {
		t.Helper()
		args := []string{"--object", aesSecret, "--image-opts"}
		for _, op := range ops {
			args = append(args, "-c", op)
		}
		mustRun(t, dir, qemuIOPath, append(args, aesOpts(driver, file))...)
	}
}

// aesWrites leave guest and host offsets apart (the first write
// allocates a high cluster first) and end in partial sectors.
var aesWrites = []string{"write -P 0x11 300001 1000", "write -P 0x22 1000 9000", "write -z 20480 4096"}

var aesFixtures = []step{
	createFormat("qcow2", "aes.qcow2", "1M", "encrypt.format=aes,encrypt.key-secret=s,cluster_size=4096", "--object", aesSecret),
	qemuIOAES("qcow2", "aes.qcow2", aesWrites...),
	createFormat("qcow", "aes.qcow", "1M", "encrypt.format=aes,encrypt.key-secret=s", "--object", aesSecret),
	qemuIOAES("qcow", "aes.qcow", aesWrites...),
	createRaw("r.raw", "1M"),
	qemuIO("raw", "r.raw", aesWrites...),
}

// aesCases are the command lines compared; with() adds the secret object
// after the command name.
func aesCases() [][]string {
	with := func(cmd string, args ...string) []string {
		return append([]string{cmd, "--object", aesSecret}, args...)
	}
	q2, q1 := aesOpts("qcow2", "aes.qcow2"), aesOpts("qcow", "aes.qcow")
	cases := [][]string{
		{"create", "-f", "qcow2", "-o", "encrypt.format=aes", "x.qcow2", "1M"},
		{"create", "-f", "qcow2", "-o", "encryption=on,encrypt.format=aes", "x.qcow2", "1M"},
		{"create", "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.cipher-alg=aes-256", "x.qcow2", "1M"},
		{"create", "-f", "qcow", "-o", "encryption=on", "x.qcow", "1M"},
		{"create", "-f", "qcow", "-o", "encrypt.format=luks", "x.qcow", "1M"},
		{"convert", "-O", "qcow2", "-o", "encryption=on", "r.raw", "o.qcow2"},
	}
	for _, q := range []string{q2, q1} {
		cases = append(cases,
			with("info", "--image-opts", q),
			with("info", "--output=json", "--image-opts", q),
			with("map", "--image-opts", q),
			with("map", "--output=json", "--image-opts", q),
			with("check", "--image-opts", q),
			with("check", "-r", "all", "--image-opts", q),
			with("compare", "--image-opts", q, "driver=raw,file.filename=r.raw"),
			with("convert", "--image-opts", q, "-O", "raw", "o.raw"),
			with("dd", "--image-opts", "if="+q, "of=o.raw", "-O", "raw"),
			with("resize", "--image-opts", q, "2M"),
		)
	}
	for _, f := range []string{"aes.qcow2", "aes.qcow"} {
		cases = append(cases, []string{"info", f}, []string{"info", "--output=json", f},
			[]string{"map", f}, []string{"check", f}, []string{"convert", "-O", "raw", f, "o.raw"})
	}
	for _, format := range []string{"qcow2", "qcow"} {
		cases = append(cases,
			with("create", "-f", format, "-o", "encrypt.format=aes,encrypt.key-secret=s", "x."+format, "1M"),
			with("create", "-f", format, "-o", "encryption=on,encrypt.key-secret=s", "x."+format, "1M"),
			with("create", "-f", format, "-o", "encrypt.format=aes,encrypt.key-secret=nope", "x."+format, "1M"),
			with("create", "-f", format, "-o", "encryption=off,encrypt.key-secret=s", "x."+format, "1M"),
			with("convert", "-O", format, "-o", "encrypt.format=aes,encrypt.key-secret=s", "r.raw", "o."+format),
			with("convert", "-c", "-O", format, "-o", "encrypt.format=aes,encrypt.key-secret=s", "r.raw", "o."+format),
			with("convert", "-O", format, "-o", "encrypt.format=aes,encrypt.key-secret=s", "--image-opts", q2, "o."+format),
		)
	}
	return append(cases,
		with("create", "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=s,compat=0.10,preallocation=metadata", "x.qcow2", "1M"),
		with("compare", "--image-opts", q2, q1),
		with("info", "--image-opts", "driver=qcow,encrypt.format=luks,encrypt.key-secret=s,file.filename=aes.qcow"),
		with("convert", "--image-opts", "driver=qcow,encrypt.format=aes,encrypt.key-secret=s,file.filename=aes.qcow", "-O", "raw", "o.raw"),
		with("info", "--image-opts", "driver=qcow2,encrypt.format=luks,encrypt.key-secret=s,file.filename=aes.qcow2"),
		with("convert", "--image-opts", "driver=qcow2,encrypt.format=aes,encrypt.key-secret=s,file.filename=aes.qcow2", "-O", "raw", "o.raw"),
	)
}

// TestAES runs each case with qemu-img and with imgfs, each in its own
// copy of the fixtures, and requires the same output and exit code and
// the same files afterwards, byte for byte.
func TestAES(t *testing.T) {
	template := t.TempDir()
	runSteps(t, template, aesFixtures)
	for _, args := range aesCases() {
		t.Run(testName(args), func(t *testing.T) {
			t.Parallel()
			refDir, ourDir, refFiles := runBothIn(t, template, args...)
			for _, f := range refFiles {
				a, err := os.ReadFile(filepath.Join(refDir, f))
				if err != nil {
					t.Fatal(err)
				}
				b, err := os.ReadFile(filepath.Join(ourDir, f))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(a, b) {
					t.Errorf("%s differs from qemu-img's (%d and %d bytes), first at %d", f, len(a), len(b), firstByteDiff(a, b))
				}
			}
		})
	}
}
