package luks

import (
	"encoding/binary"
	"hash"
)

// The anti-forensic splitter (LUKS1 spec, section 2.4) spreads a key over
// many stripes so that wiping any part of them destroys it.

// diffuse replaces block with its diffusion: each digest-sized piece i
// becomes hash(be32(i) || piece), cut to the piece's length.
func diffuse(newHash func() hash.Hash, block []byte) {
	h := newHash()
	size := h.Size()
	var idx [4]byte
	for i, off := 0, 0; off < len(block); i, off = i+1, off+size {
		end := min(off+size, len(block))
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Write(idx[:])
		h.Write(block[off:end])
		copy(block[off:end], h.Sum(nil))
	}
}

// afMerge recovers a key of len(split)/stripes bytes from its stripes.
func afMerge(newHash func() hash.Hash, split []byte, stripes int) []byte {
	n := len(split) / stripes
	key := make([]byte, n)
	for i := range stripes {
		xorInto(key, split[i*n:(i+1)*n])
		if i < stripes-1 {
			diffuse(newHash, key)
		}
	}
	return key
}

// afSplit spreads key over stripes using random, which must hold
// (stripes-1)*len(key) random bytes; it returns stripes*len(key) bytes.
func afSplit(newHash func() hash.Hash, key, random []byte, stripes int) []byte {
	n := len(key)
	split := make([]byte, stripes*n)
	copy(split, random[:(stripes-1)*n])
	acc := make([]byte, n)
	for i := range stripes - 1 {
		xorInto(acc, split[i*n:(i+1)*n])
		diffuse(newHash, acc)
	}
	last := split[(stripes-1)*n:]
	copy(last, key)
	xorInto(last, acc)
	return split
}

func xorInto(dst, src []byte) {
	for i := range dst {
		dst[i] ^= src[i]
	}
}
