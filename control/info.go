package control

import (
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
)

// Opener opens an image for an operation the way the caller's command
// line asks (format, --image-opts, -U, cache mode). format "" probes.
type Opener func(filename, format string) (formats.Image, error)

// InfoOptions are the inputs of `qemu-img info`.
type InfoOptions struct {
	Filename string
	Format   string
	// BackingChain describes every image of the backing chain.
	BackingChain bool
	// Open opens one image; info never reads guest data, so it may
	// leave the backing chain closed.
	Open Opener
	// Name, when set, is what the top image is called instead of its
	// file name: the json: name QEMU gives an image opened with options
	// a file name cannot express.
	Name string
}

// ImageInfo is QAPI's ImageInfo as qemu-img info fills it
// (block/qapi.c bdrv_query_image_info).
type ImageInfo struct {
	Filename    string
	Format      string
	VirtualSize int64
	// ActualSize is the host file's allocation; HasActualSize is false
	// when it could not be determined.
	ActualSize    int64
	HasActualSize bool
	Description   formats.Description
	// BackingFilename is the name stored in the image,
	// FullBackingFilename that name resolved against the image's
	// directory, BackingFormat the stored format ("" when none).
	BackingFilename     string
	FullBackingFilename string
	BackingFormat       string
}

// InfoList is the result of info: one entry, or the whole chain from the
// top with --backing-chain.
type InfoList struct {
	Images []*ImageInfo
	chain  bool
}

// Info collects image information as img_info's collect_image_info_list
// does, following backing files when asked.
func Info(o InfoOptions) (*InfoList, error) {
	list := &InfoList{chain: o.BackingChain}
	seen := map[string]bool{}
	filename, format := o.Filename, o.Format
	for filename != "" {
		// Like qemu-img, loops are found by the names as written, so a
		// loop through differently spelled names runs until the opener's
		// depth limit.
		if seen[filename] {
			return nil, fmt.Errorf("Backing file '%s' creates an infinite loop.", filename)
		}
		seen[filename] = true
		img, err := o.Open(filename, format)
		if err != nil {
			return nil, err
		}
		info, err := QueryImageInfo(img)
		img.Close()
		if err != nil {
			return nil, err
		}
		if len(list.Images) == 0 && o.Name != "" {
			info.Filename = o.Name
		}
		list.Images = append(list.Images, info)
		if !o.BackingChain {
			break
		}
		filename, format = info.FullBackingFilename, info.BackingFormat
	}
	return list, nil
}

// QueryImageInfo describes an open image.
func QueryImageInfo(img formats.Image) (*ImageInfo, error) {
	info := &ImageInfo{
		Filename:    img.Filename(),
		Format:      img.Format(),
		VirtualSize: img.Size(),
		// Images without a Describer answer like raw: no cluster
		// size, a clean dirty flag.
		Description: formats.Description{HasDirtyFlag: true},
	}
	var st unix.Stat_t
	if err := unix.Stat(img.Filename(), &st); err == nil {
		info.ActualSize, info.HasActualSize = st.Blocks*512, true
	}
	if a, ok := img.(formats.AllocatedSizer); ok {
		if n, err := a.AllocatedSize(); err == nil {
			info.ActualSize, info.HasActualSize = n, true
		}
	}
	if d, ok := img.(formats.Describer); ok {
		desc, err := d.Describe()
		if err != nil {
			return nil, err
		}
		info.Description = *desc
	}
	if b, ok := img.(formats.Backed); ok {
		name, format := b.BackingInfo()
		if name != "" {
			info.BackingFilename = name
			info.FullBackingFilename = formats.BackingPath(img.Filename(), name)
			info.BackingFormat = format
		}
	}
	return info, nil
}

// Object is the ImageInfo as its QAPI structure, members in schema
// order.
func (i *ImageInfo) Object() formats.Object {
	d := &i.Description
	o := formats.Object{{Key: "filename", Value: i.Filename}, {Key: "format", Value: i.Format}}
	if d.HasDirtyFlag {
		o = append(o, formats.Member{Key: "dirty-flag", Value: d.DirtyFlag})
	}
	if i.HasActualSize {
		o = append(o, formats.Member{Key: "actual-size", Value: i.ActualSize})
	}
	o = append(o, formats.Member{Key: "virtual-size", Value: i.VirtualSize})
	if d.ClusterSize != 0 {
		o = append(o, formats.Member{Key: "cluster-size", Value: d.ClusterSize})
	}
	if d.Encrypted {
		o = append(o, formats.Member{Key: "encrypted", Value: true})
	}
	if i.BackingFilename != "" {
		o = append(o, formats.Member{Key: "backing-filename", Value: i.BackingFilename},
			formats.Member{Key: "full-backing-filename", Value: i.FullBackingFilename})
		if i.BackingFormat != "" {
			o = append(o, formats.Member{Key: "backing-filename-format", Value: i.BackingFormat})
		}
	}
	if len(d.Snapshots) > 0 {
		snaps := make([]any, len(d.Snapshots))
		for k, s := range d.Snapshots {
			snaps[k] = snapshotObject(s)
		}
		o = append(o, formats.Member{Key: "snapshots", Value: snaps})
	}
	if d.FormatSpecific != nil {
		o = append(o, formats.Member{Key: "format-specific", Value: formats.Object{
			{Key: "type", Value: d.FormatSpecific.Type},
			{Key: "data", Value: d.FormatSpecific.Data},
		}})
	}
	return o
}

// snapshotObject is QAPI's SnapshotInfo.
func snapshotObject(s formats.Snapshot) formats.Object {
	o := formats.Object{
		{Key: "id", Value: s.ID},
		{Key: "name", Value: s.Name},
		{Key: "vm-state-size", Value: s.VMStateSize},
		{Key: "date-sec", Value: int64(s.DateSec)},
		{Key: "date-nsec", Value: int64(s.DateNsec)},
		{Key: "vm-clock-sec", Value: s.VMClockNsec / 1e9},
		{Key: "vm-clock-nsec", Value: s.VMClockNsec % 1e9},
	}
	if s.HasICount {
		o = append(o, formats.Member{Key: "icount", Value: s.ICount})
	}
	return o
}

// Human renders the image as bdrv_image_info_dump does.
func (i *ImageInfo) Human() string {
	var b strings.Builder
	d := &i.Description
	disk := "unavailable"
	if i.HasActualSize {
		disk = SizeToStr(uint64(i.ActualSize))
	}
	fmt.Fprintf(&b, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		i.Filename, i.Format, SizeToStr(uint64(i.VirtualSize)), i.VirtualSize, disk)
	if d.Encrypted {
		b.WriteString("encrypted: yes\n")
	}
	if d.ClusterSize != 0 {
		fmt.Fprintf(&b, "cluster_size: %d\n", d.ClusterSize)
	}
	if d.HasDirtyFlag && d.DirtyFlag {
		b.WriteString("cleanly shut down: no\n")
	}
	if i.BackingFilename != "" {
		fmt.Fprintf(&b, "backing file: %s", i.BackingFilename)
		if i.FullBackingFilename != i.BackingFilename {
			fmt.Fprintf(&b, " (actual path: %s)", i.FullBackingFilename)
		}
		b.WriteByte('\n')
		if i.BackingFormat != "" {
			fmt.Fprintf(&b, "backing file format: %s\n", i.BackingFormat)
		}
	}
	if len(d.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		b.WriteString(SnapshotTable(d.Snapshots))
	}
	if d.FormatSpecific != nil {
		b.WriteString("Format specific information:\n")
		humanDump(&b, 1, d.FormatSpecific.Data)
	}
	return b.String()
}

// SnapshotTable renders snapshots as bdrv_snapshot_dump does for info
// and `snapshot -l`: a header line and one line per snapshot, dates in
// local time.
func SnapshotTable(snaps []formats.Snapshot) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, s := range snaps {
		secs := s.VMClockNsec / 1e9
		clock := fmt.Sprintf("%02d:%02d:%02d.%03d", int32(secs/3600), int32(secs/60%60), int32(secs%60),
			int32(s.VMClockNsec/1e6%1000))
		icount := ""
		if s.HasICount {
			icount = fmt.Sprint(int64(s.ICount))
		}
		date := time.Unix(int64(s.DateSec), 0).Local().Format("2006-01-02 15:04:05")
		fmt.Fprintf(&b, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, SizeToStr(s.VMStateSize), date, clock, icount)
	}
	return b.String()
}

// Human renders the list as img_info does: entries separated by a blank
// line.
func (l *InfoList) Human() string {
	parts := make([]string, len(l.Images))
	for k, i := range l.Images {
		parts[k] = i.Human()
	}
	return strings.Join(parts, "\n")
}

// JSON renders the list as img_info does: one object, or an array of
// them with --backing-chain. The text ends with a newline.
func (l *InfoList) JSON() string {
	if !l.chain {
		return MarshalQJSON(l.Images[0].Object()) + "\n"
	}
	objs := make([]any, len(l.Images))
	for k, i := range l.Images {
		objs[k] = i.Object()
	}
	return MarshalQJSON(objs) + "\n"
}
