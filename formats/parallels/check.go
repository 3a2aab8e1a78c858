package parallels

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"

	"github.com/imgfs/imgfs/formats"
)

// Check is parallels_co_check: an image left in use is one corruption
// (repaired by closing it cleanly), a catalog entry pointing past the end
// of the file is one corruption (repaired by dropping the entry), and
// file space past the last cluster is leaked (repaired by truncating).
// The cluster statistics count allocated clusters and those not
// following the previous one in the file.
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	fixErrors := mode == formats.CheckFixAll
	fixLeaks := mode != formats.CheckReadOnly
	if mode != formats.CheckReadOnly && img.readOnly {
		return nil, formats.ErrReadOnly
	}
	size, err := img.f.Size()
	if err != nil {
		return nil, err
	}
	// QEMU measures the file in whole sectors.
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	img.mu.Lock()
	defer img.mu.Unlock()
	word := func(fix bool) string {
		if fix {
			return "Repairing"
		}
		return "ERROR"
	}
	res := &formats.CheckResult{TotalClusters: int64(len(img.bat))}
	if img.unclean {
		report(fmt.Sprintf("%s image was not closed correctly\n", word(fixErrors)))
		res.Corruptions++
		if fixErrors {
			// Close marks the image clean.
			res.CorruptionsFixed++
			img.unclean = false
		}
	}
	var high, prev int64
	for i, e := range img.bat {
		if i%(1<<16) == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		off := int64(e) * img.mult * sectorSize
		if off == 0 {
			prev = 0
			continue
		}
		if off > size {
			report(fmt.Sprintf("%s cluster %d is outside image\n", word(fixErrors), i))
			res.Corruptions++
			if fixErrors {
				if err := img.setEntry(int64(i), 0); err != nil {
					res.CheckErrors++
					return res, err
				}
				prev = 0
				res.CorruptionsFixed++
				continue
			}
		}
		res.AllocatedClusters++
		high = max(high, off)
		if prev != 0 && prev+img.cluster != off {
			res.FragmentedClusters++
		}
		prev = off
	}
	res.ImageEndOffset = high + img.cluster
	if size > res.ImageEndOffset {
		count := (size - res.ImageEndOffset + img.cluster - 1) / img.cluster
		report(fmt.Sprintf("%s space leaked at the end of the image %d\n", word(fixLeaks), size-res.ImageEndOffset))
		res.Leaks += count
		if fixLeaks {
			if err := img.f.Truncate(res.ImageEndOffset); err != nil {
				res.CheckErrors++
				return res, err
			}
			res.LeaksFixed += count
		}
	}
	if mode != formats.CheckReadOnly {
		if err := img.f.Sync(); err != nil {
			res.CheckErrors++
			return res, err
		}
	}
	return res, nil
}

// setEntry writes catalog entry i. The caller holds mu exclusively.
//
// Like parallels_co_flush_to_os it writes the whole piece of header and
// catalog (batBlock bytes, cut at the catalog's end) that holds the
// entry: the same file blocks get written, so the file's allocation
// stays the same as with QEMU.
func (img *Image) setEntry(i int64, e uint32) error {
	old := img.bat[i]
	img.bat[i] = e
	block := int64(batBlock())
	start := (headerSize + 4*i) / block * block
	buf := make([]byte, min(block, headerSize+4*int64(len(img.bat))-start))
	pos := start
	if pos < headerSize {
		pos += int64(copy(buf, img.hdr.encode()[pos:]))
	}
	for j := (pos - headerSize) / 4; pos < start+int64(len(buf)); j++ {
		binary.LittleEndian.PutUint32(buf[pos-start:], img.bat[j])
		pos += 4
	}
	if _, err := img.f.WriteAt(buf, start); err != nil {
		img.bat[i] = old
		return err
	}
	return nil
}

// batBlock is QEMU's bat_dirty_block, the unit in which it writes the
// catalog back: four host pages.
func batBlock() int { return 4 * os.Getpagesize() }
