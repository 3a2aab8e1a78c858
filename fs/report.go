package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// reportKind is one report file: its name and how its text is made.
type reportKind struct {
	name string
	// open is how the image is opened for the report when the mount
	// does not have it open already.
	open formats.OpenOptions
	// render makes the report from the open image.
	render func(ctx context.Context, img formats.Image, path string) ([]byte, error)
	// textErrors: a failure is shown as the file's text (what the
	// command would print on stderr) instead of failing the open.
	textErrors bool
	// repairs: writing "leaks" or "all" repairs the image.
	repairs bool
}

// reportKinds are the report files of every image directory. Each one
// prints what `imgfs info`, `info --output=json`, `map --output=json`
// and `check` print for the image's path.
var reportKinds = []*reportKind{
	{name: "info", open: peekOptions, render: renderInfo(false), textErrors: true},
	{name: "info.json", open: peekOptions, render: renderInfo(true)},
	{name: "map.json", open: formats.OpenOptions{ReadOnly: true, ForceShare: true}, render: renderMap},
	{name: "check", open: formats.OpenOptions{ReadOnly: true, ForceShare: true, Check: true},
		render: renderCheck, textErrors: true, repairs: true},
}

func renderInfo(asJSON bool) func(context.Context, formats.Image, string) ([]byte, error) {
	return func(_ context.Context, img formats.Image, _ string) ([]byte, error) {
		info, err := control.QueryImageInfo(img)
		if err != nil {
			return nil, err
		}
		list := &control.InfoList{Images: []*control.ImageInfo{info}}
		if asJSON {
			return []byte(list.JSON()), nil
		}
		return []byte(list.Human()), nil
	}
}

func renderMap(ctx context.Context, img formats.Image, _ string) ([]byte, error) {
	text, err := control.Map(ctx, control.MapOptions{Image: img, MaxLength: -1}).JSON()
	return []byte(text), err
}

func renderCheck(ctx context.Context, img formats.Image, path string) ([]byte, error) {
	text := checkReport(ctx, img, path, formats.CheckReadOnly)
	// A check the reader gave up on (a signal interrupts the request)
	// is no report to keep: the restarted call runs it again.
	return text, ctx.Err()
}

// checkReport runs a check and renders it as `imgfs check` prints it:
// the per-cluster messages (stderr) first, as they come out ahead of
// the buffered report, then the report or the error.
func checkReport(ctx context.Context, img formats.Image, path string, mode formats.CheckMode) []byte {
	var b bytes.Buffer
	rep, err := control.Check(ctx, control.CheckOptions{
		Image: img, Filename: path, Mode: mode,
		Report: func(msg string) {
			b.WriteString(msg)
			if !strings.HasSuffix(msg, "\n") {
				b.WriteByte('\n')
			}
		},
	})
	switch {
	case errors.Is(err, control.ErrCheckUnsupported):
		fmt.Fprintf(&b, "%v\n", err)
	case err != nil:
		if rep != nil {
			b.WriteString(rep.RepairSummary())
		}
		fmt.Fprintf(&b, "Check failed: %v\n", err)
	default:
		b.WriteString(rep.Human())
		if rep.CheckErrors != 0 {
			b.WriteString("Check failed\n")
		}
	}
	return b.Bytes()
}

// reportNode is one report file. Its text is made when it is opened or
// its size is asked for, and kept while the image is unchanged, so that
// st_size is right before the first read and every open sees one
// consistent text.
type reportNode struct {
	gofs.Inode
	dir  *imageDir
	kind *reportKind

	// mu guards the cache below and serialises making the text.
	mu    sync.Mutex
	valid bool
	// chain is the version of the image's files the text was made from,
	// gen the mount's count of changes to it.
	chain   chainEntry
	gen     uint64
	content []byte
	err     error
	// version changes whenever content does; served is the version the
	// last open got, so an open of the same version keeps the kernel's
	// cached pages.
	version, served uint64
}

var (
	_ gofs.NodeGetattrer = (*reportNode)(nil)
	_ gofs.NodeSetattrer = (*reportNode)(nil)
	_ gofs.NodeOpener    = (*reportNode)(nil)
)

// reportHandle is one open of a report file with the text it read.
type reportHandle struct {
	node    *reportNode
	content []byte
}

var (
	_ gofs.FileReader = (*reportHandle)(nil)
	_ gofs.FileWriter = (*reportHandle)(nil)
)

// text returns the current report and its version.
func (n *reportNode) text(ctx context.Context) ([]byte, uint64, error) {
	ce := n.dir.t.src.chain(n.dir.path)
	gen := n.dir.gen.Load()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.valid && ce.err == nil && n.chain.sameVersion(ce) && n.gen == gen {
		return n.content, n.version, n.err
	}
	var content []byte
	err := n.dir.use(n.kind.open, func(img formats.Image) error {
		var err error
		content, err = n.kind.render(ctx, img, n.dir.path)
		return err
	})
	if errors.Is(err, context.Canceled) {
		return nil, 0, err // the caller gave up; nothing to remember
	}
	if err != nil && n.kind.textErrors {
		content, err = []byte(openErrorText(n.dir.path, err)), nil
	}
	n.store(ce, gen, content, err)
	return n.content, n.version, n.err
}

// openErrorText words a failure to open the image as the command line
// does, without the program name.
func openErrorText(path string, err error) string {
	return fmt.Sprintf("Could not open '%s': %v\n", path, err)
}

// store caches a report text; n.mu is held.
func (n *reportNode) store(ce chainEntry, gen uint64, content []byte, err error) {
	if !n.valid || !bytes.Equal(content, n.content) || (err == nil) != (n.err == nil) {
		n.version++
	}
	n.valid, n.chain, n.gen, n.content, n.err = true, ce, gen, content, err
}

func (n *reportNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	content, _, err := n.text(ctx)
	if errors.Is(err, context.Canceled) {
		return syscall.EINTR
	}
	n.fillAttr(len(content), &out.Attr)
	return 0
}

func (n *reportNode) fillAttr(size int, a *fuse.Attr) {
	key, err := statFile(n.dir.path)
	if err != nil {
		key = n.dir.key
	}
	a.Mode = syscall.S_IFREG | 0o444
	if n.kind.repairs && !n.dir.t.readOnly {
		a.Mode |= 0o200
	}
	a.Size = uint64(size)
	setHostAttr(a, key)
}

func (n *reportNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		switch {
		case !n.kind.repairs:
			return nil, 0, syscall.EACCES
		case n.dir.t.readOnly:
			return nil, 0, syscall.EROFS
		}
		if flags&syscall.O_ACCMODE == syscall.O_WRONLY {
			return &reportHandle{node: n}, fuse.FOPEN_DIRECT_IO, 0
		}
	}
	content, version, err := n.text(ctx)
	if err != nil {
		return nil, 0, Errno(err)
	}
	// A file that is written is read with direct I/O: the kernel sets
	// its own idea of the size on `> check` (an O_TRUNC open makes it 0,
	// the write of "leaks\n" 6) and would cut reads short at it, or
	// serve the written bytes from its cache.
	if n.kind.repairs {
		return &reportHandle{node: n, content: content}, fuse.FOPEN_DIRECT_IO, 0
	}
	n.mu.Lock()
	var fuseFlags uint32
	if version == n.served {
		fuseFlags = fuse.FOPEN_KEEP_CACHE
	}
	n.served = version
	n.mu.Unlock()
	return &reportHandle{node: n, content: content}, fuseFlags, 0
}

// Setattr accepts the truncation that `echo all > check` asks for; the
// text is replaced by the repair's report anyway.
func (n *reportNode) Setattr(ctx context.Context, _ gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetSize(); ok && !n.kind.repairs {
		return syscall.EACCES
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	content, _, _ := n.text(ctx)
	n.fillAttr(len(content), &out.Attr)
	return 0
}

func (h *reportHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(len(h.content)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(h.content[off:min(int64(len(h.content)), off+int64(len(dest)))]), 0
}

// Write runs a repair: "leaks" or "all" as `check -r` takes them. The
// write returns when the repair is done; the next open reads its report.
func (h *reportHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	n := h.node
	if !n.kind.repairs {
		return 0, syscall.EACCES
	}
	var mode formats.CheckMode
	switch strings.TrimSpace(string(data)) {
	case "leaks":
		mode = formats.CheckFixLeaks
	case "all":
		mode = formats.CheckFixAll
	default:
		return 0, syscall.EINVAL
	}
	d := n.dir
	if _, err := d.acquire(true); err != nil {
		return 0, Errno(err)
	}
	defer d.release()
	n.mu.Lock()
	defer n.mu.Unlock()
	var content []byte
	err := d.withImage(func(img formats.Image) error {
		content = checkReport(ctx, img, d.path, mode)
		return img.Flush()
	})
	if err != nil {
		return 0, Errno(err)
	}
	d.changed()
	n.store(d.t.src.chain(d.path), d.gen.Load(), content, nil)
	// The repair did not go through disk; drop what the kernel caches,
	// and its idea of check's size, which the write just set.
	notifyContent(d.disk, 0, 0)
	notifyContent(&n.Inode, 0, 0)
	return uint32(len(data)), 0
}
