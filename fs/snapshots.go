package fs

import (
	"context"
	"errors"
	"io"
	"sort"
	"strings"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// snapshotsDir is `snapshots/`: one read-only raw file per internal
// snapshot, named by the snapshot's name, or by its ID when the name is
// empty. A name that cannot be a file name ("." , "..", one with a
// slash) is shown by its ID; of several snapshots with one name the
// first in the table is shown. Creating a file takes a snapshot of the
// current state, unlinking one deletes the snapshot, renaming is EPERM.
//
// The directory is in every image directory. For formats without
// internal snapshots it is empty and read-only (mode 0555): creating
// in it fails with EOPNOTSUPP. Asking whether the format has snapshots
// would cost an open of the image on every listing of its directory.
type snapshotsDir struct {
	gofs.Inode
	dir *imageDir
	st  *opState
}

var (
	_ gofs.NodeGetattrer = (*snapshotsDir)(nil)
	_ gofs.NodeLookuper  = (*snapshotsDir)(nil)
	_ gofs.NodeReaddirer = (*snapshotsDir)(nil)
	_ gofs.NodeCreater   = (*snapshotsDir)(nil)
	_ gofs.NodeUnlinker  = (*snapshotsDir)(nil)
	_ gofs.NodeRenamer   = (*snapshotsDir)(nil)
)

// snapshotOpen opens the image to read its snapshot table and views
// when the mount does not have it open: read-only, sharing it with
// writers (as qemu-img -U), so that listing never conflicts with a VM.
var snapshotOpen = formats.OpenOptions{ReadOnly: true, ForceShare: true}

// snapshotEntry is one file of the directory.
type snapshotEntry struct {
	name string
	snap formats.Snapshot
}

// entryName is the file name of a snapshot.
func entryName(s formats.Snapshot) string {
	switch n := s.Name; {
	case n == "" || n == "." || n == ".." || strings.ContainsRune(n, '/'):
		return s.ID
	default:
		return n
	}
}

// snapshotEntries maps a snapshot table to file names, first one wins.
func snapshotEntries(list []formats.Snapshot) []snapshotEntry {
	seen := map[string]bool{}
	var out []snapshotEntry
	for _, s := range list {
		n := entryName(s)
		if n == "" || seen[n] {
			continue
		}
		seen[n] = true
		out = append(out, snapshotEntry{name: n, snap: s})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// supported reports whether the image has internal snapshots.
func (s *snapshotsDir) supported() bool {
	ok := false
	_ = s.dir.use(peekOptions, func(img formats.Image) error {
		_, ok = img.(formats.Snapshotter)
		return nil
	})
	return ok
}

// entries lists the snapshots; an image without them has none.
func (s *snapshotsDir) entries() ([]snapshotEntry, error) {
	var list []formats.Snapshot
	err := s.dir.use(snapshotOpen, func(img formats.Image) error {
		sn, ok := img.(formats.Snapshotter)
		if !ok {
			return nil
		}
		var err error
		list, err = sn.Snapshots()
		return err
	})
	return snapshotEntries(list), err
}

func (s *snapshotsDir) find(name string) (snapshotEntry, bool, error) {
	ents, err := s.entries()
	if err != nil {
		return snapshotEntry{}, false, err
	}
	for _, e := range ents {
		if e.name == name {
			return e, true, nil
		}
	}
	return snapshotEntry{}, false, nil
}

func (s *snapshotsDir) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = dirMode(s.dir.t.readOnly || !s.supported())
	key, err := statFile(s.dir.path)
	if err != nil {
		key = s.dir.key
	}
	setHostAttr(&out.Attr, key)
	return 0
}

func (s *snapshotsDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	ents, err := s.entries()
	if err != nil {
		return nil, Errno(err)
	}
	out := make([]fuse.DirEntry, len(ents))
	for i, e := range ents {
		out[i] = fuse.DirEntry{Name: e.name, Mode: syscall.S_IFREG}
	}
	return gofs.NewListDirStream(out), 0
}

func (s *snapshotsDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	e, ok, err := s.find(name)
	if err != nil {
		return nil, Errno(err)
	}
	if !ok {
		return nil, syscall.ENOENT
	}
	return s.node(ctx, e, &out.Attr)
}

// node returns the inode of a snapshot file, reusing the one the tree
// has while it still stands for the same snapshot.
func (s *snapshotsDir) node(ctx context.Context, e snapshotEntry, a *fuse.Attr) (*gofs.Inode, syscall.Errno) {
	f := &snapshotFile{dir: s.dir, id: e.snap.ID, name: e.name}
	if errno := f.fillAttr(a); errno != 0 {
		return nil, errno
	}
	if ch := s.GetChild(e.name); ch != nil {
		if old, ok := ch.Operations().(*snapshotFile); ok && old.id == f.id {
			return ch, 0
		}
	}
	return s.NewInode(ctx, f, gofs.StableAttr{Mode: syscall.S_IFREG}), 0
}

// Create takes a snapshot called name of the image as it is now (touch,
// creat(2)). The image is flushed first, so the snapshot holds every
// write that reached disk. An existing name is EEXIST.
func (s *snapshotsDir) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	if s.dir.t.readOnly {
		return nil, nil, 0, syscall.EROFS
	}
	if !s.supported() {
		return nil, nil, 0, syscall.EOPNOTSUPP
	}
	if _, ok, _ := s.find(name); ok {
		return nil, nil, 0, syscall.EEXIST
	}
	s.st.begin("snapshot")
	err := s.dir.modify(false, func(img formats.Image) error {
		if err := img.Flush(); err != nil {
			return err
		}
		_, err := control.Snapshot(control.SnapshotOptions{Image: img, Action: control.SnapshotCreate, Name: name})
		return err
	})
	s.st.end(err)
	if err != nil {
		return nil, nil, 0, Errno(err)
	}
	e, ok, err := s.find(name)
	if err != nil || !ok {
		// Taken, but deleted again before it could be looked up.
		return nil, nil, 0, syscall.EIO
	}
	ch, errno := s.node(ctx, e, &out.Attr)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ch, &snapshotHandle{}, 0, 0
}

// Unlink deletes the snapshot.
func (s *snapshotsDir) Unlink(ctx context.Context, name string) syscall.Errno {
	if s.dir.t.readOnly {
		return syscall.EROFS
	}
	e, ok, err := s.find(name)
	if err != nil {
		return Errno(err)
	}
	if !ok {
		return syscall.ENOENT
	}
	s.st.begin("snapshot")
	err = s.dir.modify(false, func(img formats.Image) error {
		sn, ok := img.(formats.Snapshotter)
		if !ok {
			return formats.ErrUnsupported
		}
		// By ID and name, so a twin of the same name stays.
		return sn.DeleteSnapshot(e.snap.ID, e.snap.Name)
	})
	s.st.end(err)
	return Errno(err)
}

// Rename is refused: a snapshot's name is not a file name to change.
func (s *snapshotsDir) Rename(ctx context.Context, name string, newParent gofs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return syscall.EPERM
}

// snapshotFile is one snapshot's guest data as a read-only raw file.
type snapshotFile struct {
	gofs.Inode
	dir *imageDir
	// id identifies the snapshot; name is the file's name.
	id, name string
}

var (
	_ gofs.NodeGetattrer = (*snapshotFile)(nil)
	_ gofs.NodeSetattrer = (*snapshotFile)(nil)
	_ gofs.NodeOpener    = (*snapshotFile)(nil)
)

// errSnapshotGone: the snapshot a file stands for was deleted.
var errSnapshotGone = errors.New("snapshot no longer exists")

// openView opens the snapshot of img as a read-only view.
func (f *snapshotFile) openView(img formats.Image) (formats.Image, error) {
	sn, ok := img.(formats.Snapshotter)
	if !ok {
		return nil, formats.ErrUnsupported
	}
	v, err := sn.OpenSnapshot(f.id, "")
	if errors.Is(err, formats.ErrSnapshotNotFound) {
		return nil, formats.Errorf(syscall.ENOENT, "%v: %s (id %s)", errSnapshotGone, f.name, f.id)
	}
	return v, err
}

// fillAttr sets the attributes: st_size is the snapshot's virtual size.
func (f *snapshotFile) fillAttr(a *fuse.Attr) syscall.Errno {
	var size int64
	err := f.dir.use(snapshotOpen, func(img formats.Image) error {
		v, err := f.openView(img)
		if err != nil {
			return err
		}
		size = v.Size()
		return v.Close()
	})
	if err != nil {
		return Errno(err)
	}
	key, serr := statFile(f.dir.path)
	if serr != nil {
		key = f.dir.key
	}
	a.Mode = syscall.S_IFREG | 0o444
	a.Size = uint64(size)
	setHostAttr(a, key)
	return 0
}

func (f *snapshotFile) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return f.fillAttr(&out.Attr)
}

// Setattr accepts new times (touch on an existing snapshot) and changes
// nothing; the content cannot be truncated.
func (f *snapshotFile) Setattr(ctx context.Context, _ gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetSize(); ok {
		return syscall.EACCES
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	return f.fillAttr(&out.Attr)
}

// Open opens the snapshot's view on the mount's shared image; the
// handle keeps the image open until it is released.
func (f *snapshotFile) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EACCES
	}
	if _, err := f.dir.acquire(false); err != nil {
		return nil, 0, Errno(err)
	}
	// The view reads through the shared image: pinned, it is not
	// swapped for a read-write one while the view is open.
	f.dir.pin(1)
	var v formats.Image
	err := f.dir.withImage(func(img formats.Image) (err error) {
		v, err = f.openView(img)
		return err
	})
	if err != nil {
		f.dir.pin(-1)
		f.dir.release()
		return nil, 0, Errno(err)
	}
	return &snapshotHandle{dir: f.dir, view: v}, 0, 0
}

// snapshotHandle is one open of a snapshot file. The handle creat(2)
// returns has no view: the new snapshot is read by opening it again.
type snapshotHandle struct {
	dir  *imageDir
	view formats.Image
}

var (
	_ gofs.FileReader   = (*snapshotHandle)(nil)
	_ gofs.FileWriter   = (*snapshotHandle)(nil)
	_ gofs.FileReleaser = (*snapshotHandle)(nil)
)

func (h *snapshotHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if h.view == nil {
		return nil, syscall.EBADF
	}
	size := h.view.Size()
	if off < 0 || off >= size {
		return fuse.ReadResultData(nil), 0
	}
	buf := dest[:min(int64(len(dest)), size-off)]
	n, err := h.view.ReadAt(buf, off)
	if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
		return nil, Errno(err)
	}
	return fuse.ReadResultData(buf[:n]), 0
}

// Write refuses: snapshots are read-only.
func (h *snapshotHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	return 0, syscall.EACCES
}

func (h *snapshotHandle) Release(ctx context.Context) syscall.Errno {
	if h.view == nil {
		return 0
	}
	err := h.view.Close()
	h.dir.pin(-1)
	h.dir.release()
	return Errno(err)
}
