package fs

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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

	// mu guards img, refs, writable, pins, closedChain and everOpen.
	// Opening, swapping and closing happen under it, so nobody sees a
	// half-open image. Lock order: mu, then swap.
	mu sync.Mutex
	// swap guards img against being swapped or closed while a holder of
	// a reference uses it: uses hold it for reading (see image), changes
	// of img for writing. A holder of swap never takes mu.
	swap sync.RWMutex
	img  formats.Image
	// refs counts open disk handles and operations using img.
	refs int
	// writable: img is open read-write, because a writer (disk opened
	// for writing, truncate, fallocate, a ctl change) needed it since
	// the image was opened; see acquire.
	writable bool
	// pins counts open snapshot files, whose views read through img.
	pins int
	// closedChain is the image's files as they were when it was last
	// closed: finding them unchanged on the next open means the
	// kernel's cached pages of disk are still right.
	closedChain chainEntry
	everOpen    bool

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
// mount allows it, the file is writable, the format is one imgfs
// writes, and the image backs no other image.
func (d *imageDir) mayWrite(key fileKey) bool {
	return !d.t.readOnly && key.writable && !d.t.src.readOnlyFormat(d.name) &&
		!d.t.src.backsAnother(d.path, key)
}

// acquire takes a reference to the shared image, opening it if needed,
// and says whether the kernel's cached pages of disk are still valid.
// Every successful acquire is paired with a release; the image itself is
// reached through image, because it may be swapped meanwhile.
//
// A reader (write false) opens the image read-only, which takes only
// QEMU's read locks, so a VM or qemu-img may still use the image as QEMU
// would let two of its own processes. A writer needs the image
// read-write: a read-only one is closed and reopened read-write, and a
// lock conflict fails the writer with ErrLocked while readers keep a
// read-only image. Once read-write, the image stays so until the last
// reference goes: downgrading when the last writer leaves would need
// another swap for no gain to most users, who close disk soon after.
func (d *imageDir) acquire(write bool) (keepCache bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.img != nil {
		if write && !d.writable {
			if err := d.reopenWritableLocked(); err != nil {
				return false, err
			}
		}
		d.refs++
		return true, nil
	}
	ce := d.t.src.chain(d.path)
	if ce.err != nil {
		return false, ce.err
	}
	if write && !d.mayWrite(ce.key) {
		return false, formats.Errorf(formats.ErrReadOnly, "%s is read-only in the mount", d.name)
	}
	img, err := d.t.src.open(d.path, formats.OpenOptions{ReadOnly: !write})
	if err != nil {
		return false, err
	}
	// refs is not 0 after a failed swap lost the image (see image): the
	// handles then left are registered already.
	if d.refs == 0 {
		if err := d.t.register(d); err != nil {
			img.Close()
			return false, err
		}
	}
	keepCache = d.everOpen && d.closedChain.sameVersion(ce)
	d.swap.Lock()
	d.img, d.writable = img, write
	d.swap.Unlock()
	d.refs++
	return keepCache, nil
}

// errPinned refuses a writer while a snapshot file is open: its view
// reads through the shared read-only image, which cannot be swapped.
var errPinned = fmt.Errorf("a snapshot of the image is open in the mount (close it first): %w", syscall.EBUSY)

// reopenWritableLocked swaps the open read-only image for a read-write
// one. Our own read-only open's locks would conflict with the new one's,
// so the old image is closed first; if the read-write open fails, a
// read-only one is opened again for the readers. It waits, holding d.mu,
// for the operations using the image to finish (d.swap).
func (d *imageDir) reopenWritableLocked() error {
	if d.pins > 0 {
		return errPinned
	}
	ce := d.t.src.chain(d.path)
	if ce.err != nil {
		return ce.err
	}
	if !d.mayWrite(ce.key) {
		return formats.Errorf(formats.ErrReadOnly, "%s is read-only in the mount", d.name)
	}
	d.swap.Lock()
	defer d.swap.Unlock()
	if err := d.img.Close(); err != nil {
		d.t.logf("imgfs: closing %s to reopen it read-write: %v", d.path, err)
	}
	img, err := d.t.src.open(d.path, formats.OpenOptions{})
	if err == nil {
		d.img, d.writable = img, true
		return nil
	}
	ro, roErr := d.t.src.open(d.path, formats.OpenOptions{ReadOnly: true})
	if roErr != nil {
		// The readers' handles now fail with EIO (see image).
		d.t.logf("imgfs: reopening %s read-only: %v", d.path, roErr)
		ro = nil
	}
	d.img = ro
	return err
}

// errImageLost: a swap failed to reopen the image for the readers.
var errImageLost = fmt.Errorf("the image could not be reopened: %w", syscall.EIO)

// image returns the shared image for one operation of a holder of a
// reference, and the function to call when the operation is done. The
// image cannot be swapped (or closed) in between, so done must come
// before anything that may wait for another request of the mount.
func (d *imageDir) image() (formats.Image, func(), error) {
	d.swap.RLock()
	if d.img == nil {
		d.swap.RUnlock()
		return nil, func() {}, errImageLost
	}
	return d.img, d.swap.RUnlock, nil
}

// withImage runs fn on the shared image; the caller holds a reference.
func (d *imageDir) withImage(fn func(formats.Image) error) error {
	img, done, err := d.image()
	if err != nil {
		return err
	}
	defer done()
	return fn(img)
}

// pin and unpin count the snapshot views reading through the image.
func (d *imageDir) pin(delta int) {
	d.mu.Lock()
	d.pins += delta
	d.mu.Unlock()
}

// release drops one reference and closes the image after the last.
func (d *imageDir) release() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refs--
	if d.refs > 0 {
		return
	}
	if d.img == nil {
		d.refs = 0
		d.t.unregister(d)
		return
	}
	if err := d.closeLocked(); err != nil {
		d.t.logf("imgfs: closing %s: %v", d.path, err)
	}
}

// releaseWait is how long commit and rebase wait for the image, and
// convert for an output image open in the mount, to close: close(2) of disk returns before the kernel's RELEASE reaches
// the server (FUSE sends it in the background), so a ctl write right
// after closing disk would otherwise still find the image open.
const releaseWait = 500 * time.Millisecond

// waitClosedLocked waits, with d.mu held, up to releaseWait for the
// image to be closed and reports whether it is.
func (d *imageDir) waitClosedLocked() bool {
	for deadline := time.Now().Add(releaseWait); d.img != nil && time.Now().Before(deadline); {
		d.mu.Unlock()
		time.Sleep(2 * time.Millisecond)
		d.mu.Lock()
	}
	return d.img == nil
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
	d.swap.Lock()
	err := d.img.Close()
	d.img, d.refs = nil, 0
	d.swap.Unlock()
	d.t.unregister(d)
	d.everOpen = true
	d.closedChain = d.t.src.chain(d.path)
	return err
}

// use runs fn on the image: the shared one when it is open, otherwise a
// private read-only one opened with o, which takes no lock that could
// keep a VM or the disk file from the image.
func (d *imageDir) use(o formats.OpenOptions, fn func(formats.Image) error) error {
	d.mu.Lock()
	if d.img != nil {
		d.refs++
		d.mu.Unlock()
		defer d.release()
		return d.withImage(fn)
	}
	d.mu.Unlock()
	if ce := d.t.src.chain(d.path); ce.err != nil {
		return ce.err
	}
	img, err := d.t.src.open(d.path, o)
	if err != nil {
		return err
	}
	defer img.Close()
	return fn(img)
}

// changed records a change made through the mount.
func (d *imageDir) changed() { d.gen.Add(1) }
