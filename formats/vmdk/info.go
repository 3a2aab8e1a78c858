package vmdk

import (
	"context"
	"fmt"

	"github.com/imgfs/imgfs/formats"
)

// Describe reports what qemu-img info shows: the cluster size when every
// extent is alike (vmdk_co_get_info; otherwise QEMU's get_info fails and
// neither the cluster size nor the dirty flag is shown), and the CIDs,
// create type and extents (vmdk_get_specific_info).
func (img *Image) Describe() (*formats.Description, error) {
	d := &formats.Description{}
	if len(img.extents) > 0 && img.uniform() {
		d.HasDirtyFlag = true
		if img.extents[0].kind != kindFlat {
			d.ClusterSize = img.extents[0].grainBytes()
		}
	}
	exts := make([]any, len(img.extents))
	for i, e := range img.extents {
		// Members in QAPI schema order; the renderer orders them as
		// QEMU's QDict does.
		o := formats.Object{
			{Key: "filename", Value: e.f.Name()},
			{Key: "format", Value: e.typ},
			{Key: "virtual-size", Value: e.sectors * sectorSize},
		}
		if e.kind != kindFlat {
			o = append(o, formats.Member{Key: "cluster-size", Value: e.grainBytes()})
		}
		if e.compressed {
			o = append(o, formats.Member{Key: "compressed", Value: true})
		}
		exts[i] = o
	}
	img.mu.Lock()
	cid := img.cid // a first write changes it
	img.mu.Unlock()
	d.FormatSpecific = &formats.Specific{Type: "vmdk", Data: formats.Object{
		{Key: "create-type", Value: img.createType},
		{Key: "cid", Value: int64(cid)},
		{Key: "parent-cid", Value: int64(img.parentCID)},
		{Key: "extents", Value: exts},
	}}
	return d, nil
}

// Check is vmdk_co_check: every grain of the image must lie inside its
// extent file. QEMU cannot repair VMDK images; like it, a repair request
// is unsupported, and the first bad grain ends the check with one
// corruption and an error (so qemu-img says "Check failed").
func (img *Image) Check(ctx context.Context, mode formats.CheckMode, report func(string)) (*formats.CheckResult, error) {
	if mode != formats.CheckReadOnly {
		return nil, fmt.Errorf("repairing vmdk images: %w", formats.ErrUnsupported)
	}
	res := &formats.CheckResult{}
	total := img.size / sectorSize
	for sector := int64(0); sector < total; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		e := img.findExtent(sector * sectorSize)
		if e == nil {
			report(fmt.Sprintf("ERROR: could not find extent for sector %d", sector))
			res.Corruptions++
			return res, errInval
		}
		img.mu.Lock()
		state, host, _, err := e.lookup(sector*sectorSize - e.start)
		img.mu.Unlock()
		if err != nil {
			report(fmt.Sprintf("ERROR: could not get cluster_offset for sector %d", sector))
			res.Corruptions++
			// get_cluster_offset's VMDK_ERROR is -1, which qemu-img
			// prints as EPERM's text.
			return res, errPerm
		}
		if state == grainData {
			size, err := e.f.Size()
			if err != nil {
				report(fmt.Sprintf("ERROR: could not get extent file length for sector %d", sector))
				res.Corruptions++
				return res, err
			}
			if host >= size {
				report(fmt.Sprintf("ERROR: cluster offset for sector %d points after EOF", sector))
				res.Corruptions++
				return res, errInval
			}
		}
		sector += e.grainSectors
	}
	return res, nil
}

// AllocatedSize is the host space of the image file and every other
// extent file (vmdk_co_get_allocated_file_size).
func (img *Image) AllocatedSize() (int64, error) {
	total, err := img.file.AllocatedSize()
	if err != nil {
		return 0, err
	}
	for _, e := range img.extents {
		if e.f == img.file {
			continue
		}
		n, err := e.f.AllocatedSize()
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}
