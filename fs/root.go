package fs

import (
	"context"
	"strconv"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// root is the mount's top directory: one subdirectory per image in
// SOURCE. It holds no list of its own; every lookup and listing asks
// SOURCE again (cheaply, see source), so images come and go without a
// remount.
type root struct {
	gofs.Inode
	t *tree
}

var (
	_ gofs.NodeLookuper   = (*root)(nil)
	_ gofs.NodeReaddirer  = (*root)(nil)
	_ gofs.NodeGetattrer  = (*root)(nil)
	_ gofs.NodeGetxattrer = (*root)(nil)
)

// pidXattr names the extended attribute of the root directory that
// holds the serving process's pid: `imgfs umount` reads it to wait until
// that process has flushed and closed every image, which happens after
// the kernel has already let the unmount return.
const pidXattr = "user.imgfs.pid"

func (r *root) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if errno := r.t.admit(ctx); errno != 0 {
		return errno
	}
	out.Mode = dirMode(r.t.readOnly)
	out.Nlink = 2
	return 0
}

func (r *root) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if attr != pidXattr {
		return 0, syscall.ENODATA
	}
	v := strconv.Itoa(syscall.Getpid())
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (r *root) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	if errno := r.t.admit(ctx); errno != 0 {
		return nil, errno
	}
	names, err := r.t.src.list()
	if err != nil {
		return nil, Errno(err)
	}
	ents := make([]fuse.DirEntry, len(names))
	for i, n := range names {
		ents[i] = fuse.DirEntry{Name: n, Mode: syscall.S_IFDIR}
	}
	return gofs.NewListDirStream(ents), 0
}

// Lookup finds the image called name. The directory node of an image is
// kept as long as the same file is there, so its open image and caches
// survive; a file replaced under the same name gets a new node.
func (r *root) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if errno := r.t.admit(ctx); errno != 0 {
		return nil, errno
	}
	key, ok := r.t.src.show(name)
	if !ok {
		return nil, syscall.ENOENT
	}
	if ch := r.GetChild(name); ch != nil {
		if d, ok := ch.Operations().(*imageDir); ok && d.key.sameFile(key) {
			d.fillAttr(key, &out.Attr)
			return ch, 0
		}
	}
	d := &imageDir{t: r.t, name: name, path: r.t.src.path(name), key: key}
	d.fillAttr(key, &out.Attr)
	return r.NewInode(ctx, d, gofs.StableAttr{Mode: syscall.S_IFDIR}), 0
}

func dirMode(readOnly bool) uint32 {
	if readOnly {
		return syscall.S_IFDIR | 0o555
	}
	return syscall.S_IFDIR | 0o755
}
