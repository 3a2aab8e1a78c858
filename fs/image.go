package fs

import (
	"context"
	"sync"
	"sync/atomic"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/formats"
)

// imageDir is the directory of one image. It owns the image's one open
// formats.Image, shared by every open disk handle and report, opened on
// first use and closed when the last user lets go.
type imageDir struct {
	gofs.Inode
	t          *tree
	name, path string
	// key is the file the node was made for (its dev and inode).
	key fileKey

	// mu guards img, refs, writable, closedKey and everOpen. Opening and
	// closing happen under it, so nobody sees a half-open image.
	mu  sync.Mutex
	img formats.Image
	// refs counts open disk handles and operations using img.
	refs     int
	writable bool
	// closedKey is the file as it was when the image was last closed:
	// finding it unchanged on the next open means the kernel's cached
	// pages of disk are still right.
	closedKey fileKey
	everOpen  bool

	// gen counts changes made through the mount; report caches include
	// it because a change may not show in the file's times at once.
	gen atomic.Uint64

	// disk is the disk file's inode, for dropping its cached pages.
	disk *gofs.Inode
}

var (
	_ gofs.NodeOnAdder   = (*imageDir)(nil)
	_ gofs.NodeGetattrer = (*imageDir)(nil)
)

// OnAdd creates the fixed entries; they live as long as the directory.
func (d *imageDir) OnAdd(ctx context.Context) {
	d.disk = d.NewPersistentInode(ctx, &diskNode{dir: d}, gofs.StableAttr{Mode: syscall.S_IFREG})
	d.AddChild("disk", d.disk, false)
	for _, k := range reportKinds {
		ch := d.NewPersistentInode(ctx, &reportNode{dir: d, kind: k}, gofs.StableAttr{Mode: syscall.S_IFREG})
		d.AddChild(k.name, ch, false)
	}
	d.AddChild("convert-to", d.NewPersistentInode(ctx, &convertDir{dir: d}, gofs.StableAttr{Mode: syscall.S_IFDIR}), false)
	// ctl, status and snapshots/ share the record of the last operation.
	st := &opState{}
	d.AddChild("ctl", d.NewPersistentInode(ctx, &ctlNode{dir: d, st: st}, gofs.StableAttr{Mode: syscall.S_IFREG}), false)
	d.AddChild("status", d.NewPersistentInode(ctx, &statusNode{dir: d, st: st}, gofs.StableAttr{Mode: syscall.S_IFREG}), false)
	d.AddChild("snapshots", d.NewPersistentInode(ctx, &snapshotsDir{dir: d, st: st}, gofs.StableAttr{Mode: syscall.S_IFDIR}), false)
}

func (d *imageDir) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	key, err := statFile(d.path)
	if err != nil {
		key = d.key // the file is gone, the directory still works
	}
	d.fillAttr(key, &out.Attr)
	return 0
}

func (d *imageDir) fillAttr(key fileKey, a *fuse.Attr) {
	a.Mode = dirMode(d.t.readOnly)
	setHostAttr(a, key)
}

// mayWrite reports whether the image would be opened read-write: the
// mount allows it, the file is writable, and it backs no other image.
func (d *imageDir) mayWrite(key fileKey) bool {
	return !d.t.readOnly && key.writable && !d.t.src.backsAnother(d.path, key)
}

// acquire returns the shared open image, opening it if needed, and
// whether it is writable and whether the kernel's cached pages of disk
// are still valid. Every successful acquire is paired with a release.
func (d *imageDir) acquire() (img formats.Image, writable, keepCache bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.img != nil {
		d.refs++
		return d.img, d.writable, true, nil
	}
	ce := d.t.src.chain(d.path)
	if ce.err != nil {
		return nil, false, false, ce.err
	}
	rw := d.mayWrite(ce.key)
	img, err = openImage(d.path, formats.OpenOptions{ReadOnly: !rw})
	if err != nil && rw {
		// A corrupt qcow2 image, or one a VM reads, may still open
		// read-only: reading is better than nothing.
		var roErr error
		if img, roErr = openImage(d.path, formats.OpenOptions{ReadOnly: true}); roErr == nil {
			d.t.logf("imgfs: %s opened read-only: %v", d.path, err)
			rw, err = false, nil
		}
	}
	if err != nil {
		return nil, false, false, err
	}
	if err := d.t.register(d); err != nil {
		img.Close()
		return nil, false, false, err
	}
	keepCache = d.everOpen && d.closedKey.same(ce.key)
	d.img, d.refs, d.writable = img, 1, rw
	return img, rw, keepCache, nil
}

// release drops one reference and closes the image after the last.
func (d *imageDir) release() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refs--
	if d.refs > 0 || d.img == nil {
		return
	}
	if err := d.closeLocked(); err != nil {
		d.t.logf("imgfs: closing %s: %v", d.path, err)
	}
}

// closeImage closes the image whatever its references (shutdown).
func (d *imageDir) closeImage() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.img == nil {
		return nil
	}
	return d.closeLocked()
}

func (d *imageDir) closeLocked() error {
	err := d.img.Close()
	d.img, d.refs = nil, 0
	d.t.unregister(d)
	d.everOpen = true
	d.closedKey, _ = statFile(d.path)
	return err
}

// use runs fn on the image: the shared one when it is open, otherwise a
// private read-only one opened with o, which takes no lock that could
// keep a VM or the disk file from the image.
func (d *imageDir) use(o formats.OpenOptions, fn func(formats.Image) error) error {
	d.mu.Lock()
	if img := d.img; img != nil {
		d.refs++
		d.mu.Unlock()
		defer d.release()
		return fn(img)
	}
	d.mu.Unlock()
	if ce := d.t.src.chain(d.path); ce.err != nil {
		return ce.err
	}
	img, err := openImage(d.path, o)
	if err != nil {
		return err
	}
	defer img.Close()
	return fn(img)
}

// changed records a change made through the mount.
func (d *imageDir) changed() { d.gen.Add(1) }
