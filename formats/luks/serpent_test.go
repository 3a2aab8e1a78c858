package luks

import (
	"bytes"
	"encoding/hex"
	"testing"
)

// TestSerpentVectors checks Serpent against published vectors: the
// NESSIE sets (Serpent-{128,192,256}-128.verified.test-vectors) and
// libgcrypt's self-test, both in the byte order QEMU uses.
func TestSerpentVectors(t *testing.T) {
	tests := []struct{ key, plain, cipher string }{
		{"80000000000000000000000000000000", "00000000000000000000000000000000", "264e5481eff42a4606abda06c0bfda3d"},
		{"40000000000000000000000000000000", "00000000000000000000000000000000", "4a231b3bc727993407ac6ec8350e8524"},
		{"800000000000000000000000000000000000000000000000", "00000000000000000000000000000000", "9e274ead9b737bb21efcfca548602689"},
		{"100000000000000000000000000000000000000000000000", "00000000000000000000000000000000", "bec1e37824cf721e5d87f6cb4ebfb9be"},
		{"0101010101010101010101010101010101010101010101010101010101010101", "01010101010101010101010101010101", "ec9723b15b2a6489f84c4524fffc2748"},
		{"0202020202020202020202020202020202020202020202020202020202020202", "02020202020202020202020202020202", "1187f485538514476184e567da0421c7"},
		{"00000000000000000000000000000000", "d29d576fcea3a3a7ed9099f29273d78e", "b2288b968ae8b08648d1ce9606fd992d"},
		{"000000000000000000000000000000000000000000000000", "d29d576fceaba3a7ed9899f2927bd78e", "130e353e1037c22405e8faefb2c3c3e9"},
		{"0000000000000000000000000000000000000000000000000000000000000000", "d095576fcea3e3a7ed98d9f29073d78e", "b90ee5862de69168f2bdd5125b45472b"},
		{"0000000000000000000000000000000000000000000000000000000000000000", "00000000010000000200000003000000", "2061a42782bd52ec691ec383b03ba77c"},
	}
	for _, tc := range tests {
		key, _ := hex.DecodeString(tc.key)
		plain, _ := hex.DecodeString(tc.plain)
		want, _ := hex.DecodeString(tc.cipher)
		c, err := newSerpent(key)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 16)
		c.Encrypt(got, plain)
		if !bytes.Equal(got, want) {
			t.Errorf("key %s: encrypt %x, want %x", tc.key, got, want)
		}
		c.Decrypt(got, got)
		if !bytes.Equal(got, plain) {
			t.Errorf("key %s: decrypt %x, want %x", tc.key, got, plain)
		}
	}
	if _, err := newSerpent(make([]byte, 20)); err == nil {
		t.Error("a 20-byte key was accepted")
	}
}

func BenchmarkSerpent(b *testing.B) {
	c, _ := newSerpent(make([]byte, 32))
	buf := make([]byte, 16)
	b.SetBytes(16)
	for b.Loop() {
		c.Encrypt(buf, buf)
	}
}

// TestSerpentSBoxes checks the generated bitsliced S-boxes and their
// inverses against the specification's tables, nibble by nibble.
func TestSerpentSBoxes(t *testing.T) {
	tables := [8][16]uint8{
		{3, 8, 15, 1, 10, 6, 5, 11, 14, 13, 4, 2, 7, 0, 9, 12},
		{15, 12, 2, 7, 9, 0, 5, 10, 1, 11, 14, 8, 6, 13, 3, 4},
		{8, 6, 7, 9, 3, 12, 10, 15, 13, 1, 14, 4, 0, 11, 5, 2},
		{0, 15, 11, 8, 12, 9, 6, 3, 13, 1, 2, 4, 10, 7, 5, 14},
		{1, 15, 8, 3, 12, 0, 11, 6, 2, 5, 4, 10, 9, 14, 7, 13},
		{15, 5, 2, 11, 4, 10, 9, 12, 0, 3, 14, 8, 13, 6, 7, 1},
		{7, 2, 12, 5, 8, 4, 6, 11, 14, 9, 1, 15, 13, 3, 10, 0},
		{1, 13, 15, 0, 14, 8, 2, 11, 7, 4, 12, 10, 9, 3, 5, 6},
	}
	// Nibble j of the bitsliced words is j mod 16, so each of the 32
	// lanes is checked, every input twice.
	var in [4]uint32
	for j := range 32 {
		for k := range 4 {
			in[k] |= uint32(j%16>>k&1) << j
		}
	}
	nibble := func(x [4]uint32, j int) uint8 {
		var v uint8
		for k := range 4 {
			v |= uint8(x[k]>>j&1) << k
		}
		return v
	}
	for i, table := range tables {
		out := in
		serpentSBox[i](&out)
		back := out
		serpentInvSBox[i](&back)
		for j := range 32 {
			if got := nibble(out, j); got != table[j%16] {
				t.Errorf("S%d(%d) = %d, want %d", i, j%16, got, table[j%16])
			}
		}
		if back != in {
			t.Errorf("S%d inverse does not invert it", i)
		}
	}
}
