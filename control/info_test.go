package control

import (
	"testing"
	"time"

	"github.com/imgfs/imgfs/formats"
)

func TestInfoHuman(t *testing.T) {
	defer func(l *time.Location) { time.Local = l }(time.Local)
	time.Local = time.UTC
	info := &ImageInfo{
		Filename: "top.qcow2", Format: "qcow2", VirtualSize: 64 << 20,
		ActualSize: 221184, HasActualSize: true,
		BackingFilename: "mid.qcow2", FullBackingFilename: "/d/mid.qcow2", BackingFormat: "qcow2",
		Description: formats.Description{
			ClusterSize: 65536, HasDirtyFlag: true, DirtyFlag: true, Encrypted: true,
			Snapshots: []formats.Snapshot{{ID: "1", Name: "snap1", DateSec: 1795237710, DateNsec: 768735000,
				VMClockNsec: 3723_004_000_000, ICount: 0, HasICount: true},
				{ID: "2", Name: "a-much-longer-snapshot-name", VMStateSize: 1 << 20}},
			FormatSpecific: &formats.Specific{Type: "qcow2", Data: formats.Object{{Key: "compat", Value: "1.1"}}},
		},
	}
	want := `image: top.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 216 KiB
encrypted: yes
cluster_size: 65536
cleanly shut down: no
backing file: mid.qcow2 (actual path: /d/mid.qcow2)
backing file format: qcow2
Snapshot list:
ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
1         snap1                 0 B 2026-11-21 05:08:30 01:02:03.004          0
2         a-much-longer-snapshot-name    1 MiB 1970-01-01 00:00:00 00:00:00.000           
Format specific information:
    compat: 1.1
`
	if got := info.Human(); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	wantJSON := `{
    "backing-filename-format": "qcow2",
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 4000000,
            "name": "snap1",
            "date-sec": 1795237710,
            "date-nsec": 768735000,
            "vm-clock-sec": 3723,
            "id": "1",
            "vm-state-size": 0
        },
        {
            "vm-clock-nsec": 0,
            "name": "a-much-longer-snapshot-name",
            "date-sec": 0,
            "date-nsec": 0,
            "vm-clock-sec": 0,
            "id": "2",
            "vm-state-size": 1048576
        }
    ],
    "virtual-size": 67108864,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 221184,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1"
        }
    },
    "full-backing-filename": "/d/mid.qcow2",
    "encrypted": true,
    "backing-filename": "mid.qcow2",
    "dirty-flag": true
}
`
	if got := (&InfoList{Images: []*ImageInfo{info}}).JSON(); got != wantJSON {
		t.Errorf("json:\n%s\nwant\n%s", got, wantJSON)
	}
}

// Info follows the chain by the resolved backing names and refuses a
// name it has seen.
func TestInfoBackingLoop(t *testing.T) {
	var opened []string
	_, err := Info(InfoOptions{Filename: "dir/a", BackingChain: true, Open: func(name, format string) (formats.Image, error) {
		opened = append(opened, name+":"+format)
		return loopImage{&stubImage{name: name}}, nil
	}})
	want := "Backing file 'dir/a' creates an infinite loop."
	if err == nil || err.Error() != want {
		t.Errorf("err %v, want %q", err, want)
	}
	if len(opened) != 2 || opened[0] != "dir/a:" || opened[1] != "dir/b:raw" {
		t.Errorf("opened %v", opened)
	}
}

// loopImage names a backing file: a's is b, b's is a.
type loopImage struct{ *stubImage }

func (l loopImage) BackingInfo() (string, string) {
	if l.name == "dir/a" {
		return "b", "raw"
	}
	return "a", ""
}
