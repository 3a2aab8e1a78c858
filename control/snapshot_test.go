package control

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imgfs/imgfs/formats"
)

// snapStub is a stubImage with internal snapshots whose operations
// record their arguments and fail with err.
type snapStub struct {
	stubImage
	list    []formats.Snapshot
	err     error
	created formats.Snapshot
	applied string
	deleted [2]string
	opened  [][2]string
}

var _ formats.Snapshotter = (*snapStub)(nil)

func (s *snapStub) Snapshots() ([]formats.Snapshot, error) { return s.list, s.err }
func (s *snapStub) CreateSnapshot(sn formats.Snapshot) error {
	s.created = sn
	return s.err
}
func (s *snapStub) ApplySnapshot(idOrName string) error { s.applied = idOrName; return s.err }
func (s *snapStub) DeleteSnapshot(id, name string) error {
	s.deleted = [2]string{id, name}
	return s.err
}
func (s *snapStub) OpenSnapshot(id, name string) (formats.Image, error) {
	s.opened = append(s.opened, [2]string{id, name})
	for _, sn := range s.list {
		if (id == "" || sn.ID == id) && (name == "" || sn.Name == name) && (id != "" || name != "") {
			return &s.stubImage, nil
		}
	}
	return nil, fmt.Errorf("%w: %s/%s", formats.ErrSnapshotNotFound, id, name)
}

func TestSnapshotActions(t *testing.T) {
	list := []formats.Snapshot{{ID: "1", Name: "a"}, {ID: "2", Name: "1"}}
	notFound := fmt.Errorf("x: %w", formats.ErrSnapshotNotFound)
	for _, tc := range []struct {
		name    string
		img     formats.Image
		action  SnapshotAction
		arg     string
		wantErr string
		wantOut string
	}{
		{"list", &snapStub{list: list[:1]}, SnapshotList, "", "",
			"Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"},
		{"list empty", &snapStub{}, SnapshotList, "", "", ""},
		{"list failing", &snapStub{err: formats.ErrUnsupported}, SnapshotList, "", "", ""},
		{"list raw", &stubImage{}, SnapshotList, "", "", ""},
		{"create", &snapStub{}, SnapshotCreate, "x", "", ""},
		{"create too many", &snapStub{err: formats.ErrnoError{Err: syscall.EFBIG}}, SnapshotCreate, "x",
			"Could not create snapshot 'x': -27 (File too large)", ""},
		{"create raw", &stubImage{}, SnapshotCreate, "x", "Could not create snapshot 'x': -95 (Operation not supported)", ""},
		{"apply", &snapStub{}, SnapshotApply, "a", "", ""},
		{"apply missing", &snapStub{err: notFound}, SnapshotApply, "z",
			"Could not apply snapshot 'z': Failed to load snapshot: No such file or directory", ""},
		{"apply raw", &stubImage{}, SnapshotApply, "z", "Could not apply snapshot 'z': Block driver does not support snapshots", ""},
		{"delete by name", &snapStub{list: list}, SnapshotDelete, "1", "", ""},
		{"delete by ID", &snapStub{list: list}, SnapshotDelete, "2", "Could not delete snapshot '2': snapshot not found", ""},
		{"delete failing", &snapStub{list: list, err: errors.New("Failed to free the cluster and L1 table: Input/output error")},
			SnapshotDelete, "a", "Could not delete snapshot 'a': Failed to free the cluster and L1 table: Input/output error", ""},
		{"delete raw", &stubImage{}, SnapshotDelete, "a", "Could not delete snapshot 'a': snapshot not found", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := Snapshot(SnapshotOptions{Image: tc.img, Action: tc.action, Name: tc.arg,
				Now: func() time.Time { return time.Unix(1700000000, 123456789) }})
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := res.Human(); !strings.HasPrefix(got, tc.wantOut) || (tc.wantOut == "") != (got == "") {
				t.Fatalf("output %q, want %q...", got, tc.wantOut)
			}
			s, _ := tc.img.(*snapStub)
			switch tc.action {
			case SnapshotCreate:
				want := formats.Snapshot{Name: "x", DateSec: 1700000000, DateNsec: 123456000, HasICount: true}
				if s.created != want {
					t.Fatalf("created %+v, want %+v", s.created, want)
				}
			case SnapshotApply:
				if s.applied != tc.arg {
					t.Fatalf("applied %q", s.applied)
				}
			case SnapshotDelete:
				if s.deleted != [2]string{"2", "1"} {
					t.Fatalf("deleted %q", s.deleted)
				}
			}
		})
	}
}

func TestNewSnapshotCutsName(t *testing.T) {
	long := strings.Repeat("n", 300)
	if got := newSnapshot(long, nil).Name; got != long[:255] {
		t.Fatalf("name of %d bytes kept as %d", len(long), len(got))
	}
}

func TestOpenSnapshot(t *testing.T) {
	list := []formats.Snapshot{{ID: "1", Name: "a"}, {ID: "2", Name: "1"}}
	for _, tc := range []struct {
		param    SnapshotParam
		wantErr  string
		wantOpen [][2]string
	}{
		{SnapshotParam{IDOrName: "1"}, "", [][2]string{{"1", ""}}},
		{SnapshotParam{IDOrName: "a"}, "", [][2]string{{"a", ""}, {"", "a"}}},
		{SnapshotParam{IDOrName: "z"}, "Failed to load snapshot: Can't find snapshot", [][2]string{{"z", ""}, {"", "z"}}},
		{SnapshotParam{ID: "2", Name: "1"}, "", [][2]string{{"2", "1"}}},
		{SnapshotParam{ID: "1", Name: "1"}, "Failed to load snapshot: Can't find snapshot", [][2]string{{"1", "1"}}},
	} {
		s := &snapStub{list: list}
		_, err := OpenSnapshot(s, tc.param)
		if (err == nil) != (tc.wantErr == "") || err != nil && err.Error() != tc.wantErr {
			t.Errorf("%+v: error %v, want %q", tc.param, err, tc.wantErr)
		}
		if fmt.Sprint(s.opened) != fmt.Sprint(tc.wantOpen) {
			t.Errorf("%+v: opened %q, want %q", tc.param, s.opened, tc.wantOpen)
		}
	}
	_, err := OpenSnapshot(&stubImage{}, SnapshotParam{IDOrName: "a"})
	if want := "Failed to load snapshot: Block format 'stub' used by device '' does not support temporarily loading internal snapshots"; err == nil || err.Error() != want {
		t.Errorf("raw: %v", err)
	}
}
