package fs

import (
	"context"
	"path/filepath"
	"sort"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/formats"
)

// backingName is the image directory's symlink to its backing image.
const backingName = "backing"

var (
	_ gofs.NodeLookuper  = (*imageDir)(nil)
	_ gofs.NodeReaddirer = (*imageDir)(nil)
)

// backingTarget is where the backing symlink points ("../base.qcow2"):
// present only when the image names a backing file that resolves to an
// image shown in the same mount, which is a file directly in SOURCE's
// directory. It reads only the header.
func (d *imageDir) backingTarget() (string, bool) {
	var name string
	_ = d.use(peekOptions, func(img formats.Image) error {
		if b, ok := img.(formats.Backed); ok {
			name, _ = b.BackingInfo()
		}
		return nil
	})
	if name == "" {
		return "", false
	}
	p := filepath.Clean(formats.BackingPath(d.path, name))
	dir := filepath.Dir(p)
	if dir != d.t.src.dir {
		if r, err := filepath.EvalSymlinks(dir); err != nil || r != d.t.src.realDir {
			return "", false
		}
	}
	base := filepath.Base(p)
	if base == d.name {
		return "", false
	}
	if _, ok := d.t.src.lookup(base); !ok {
		return "", false
	}
	return "../" + base, true
}

// Lookup finds the fixed entries made in OnAdd, and backing, whose
// presence depends on the image's header at the time of the lookup.
func (d *imageDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if name == backingName {
		target, ok := d.backingTarget()
		if !ok {
			return nil, syscall.ENOENT
		}
		l := &backingLink{dir: d}
		l.fillAttr(target, &out.Attr)
		if ch := d.GetChild(name); ch != nil {
			return ch, 0
		}
		return d.NewInode(ctx, l, gofs.StableAttr{Mode: syscall.S_IFLNK}), 0
	}
	ch := d.GetChild(name)
	if ch == nil {
		return nil, syscall.ENOENT
	}
	// As go-fuse does for a directory without Lookup: the child's
	// attributes come with the entry.
	if ga, ok := ch.Operations().(gofs.NodeGetattrer); ok {
		var a fuse.AttrOut
		if ga.Getattr(ctx, nil, &a) == 0 {
			out.Attr = a.Attr
		}
	}
	return ch, 0
}

// Readdir lists the fixed entries and backing when it is present.
func (d *imageDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	var ents []fuse.DirEntry
	for name, ch := range d.Children() {
		if name != backingName {
			ents = append(ents, fuse.DirEntry{Name: name, Mode: ch.Mode()})
		}
	}
	if _, ok := d.backingTarget(); ok {
		ents = append(ents, fuse.DirEntry{Name: backingName, Mode: syscall.S_IFLNK})
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	return gofs.NewListDirStream(ents), 0
}

// backingLink is the backing symlink; its target is read anew each
// time, as a rebase may change it.
type backingLink struct {
	gofs.Inode
	dir *imageDir
}

var (
	_ gofs.NodeReadlinker = (*backingLink)(nil)
	_ gofs.NodeGetattrer  = (*backingLink)(nil)
)

func (l *backingLink) fillAttr(target string, a *fuse.Attr) {
	a.Mode = syscall.S_IFLNK | 0o777
	a.Size = uint64(len(target))
	key, err := statFile(l.dir.path)
	if err != nil {
		key = l.dir.key
	}
	setHostAttr(a, key)
}

func (l *backingLink) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	target, ok := l.dir.backingTarget()
	if !ok {
		return syscall.ENOENT
	}
	l.fillAttr(target, &out.Attr)
	return 0
}

func (l *backingLink) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	target, ok := l.dir.backingTarget()
	if !ok {
		return nil, syscall.ENOENT
	}
	return []byte(target), 0
}
