package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

// The ctl file takes one command line per write(2), for the image whose
// directory it sits in (DESIGN.md, "The mounted tree"). The grammar:
//
//	line    = command { option | operand }
//	option  = "-x" [value] | "--long" [value]   (value as the next field)
//	fields are separated by blanks; there is no quoting; "--" ends options
//
//	commit  [-b BASE] [-d] [-r RATE]
//	rebase  [-u] [-b BACKING] [-F FMT]          (-b "" is not expressible:
//	                                             "rebase -u" drops the backing)
//	resize  [--shrink] [--preallocation MODE] [+|-]SIZE   (SIZE is the last field)
//	snapshot -c|-a|-d NAME
//	convert [-c] -O FMT [-o OPTS] [-r RATE] OUTPUT   (OUTPUT relative to SOURCE)
//	amend   -o OPTS [--force] [--object secret,id=ID,data=DATA|file=PATH]...
//	bitmap  (--add|--remove|--clear|--enable|--disable|--merge SRC)... [-g GRAN] NAME
//	check   -r leaks|all
//
// Options take their values as qemu-img does and go into the same
// control option structs the command line fills, so the mount and the
// CLI behave alike; RATE is bytes per second with qemu-img's suffixes.
// The image itself is never named: it is the directory.
// A malformed line fails with EINVAL before anything is opened.
//
// amend's secrets are what LUKS key slot options (new-secret,
// old-secret) name: the mount's passphrase (-o key_file) is the secret
// imgfs-mount-key, and --object defines more as qemu-img's does, its
// data raw (",," is a comma; a value with blanks goes in a file). A file
// is read relative to, and must lie inside, the mounted directory unless
// the mount allows outside paths, as for convert's output: the mount may
// read what the writer of ctl cannot.

// errUsage tags a command line ctl cannot read; it becomes EINVAL.
var errUsage = errors.New("invalid ctl command")

func usagef(format string, args ...any) error {
	return formats.Errorf(errUsage, format, args...)
}

// ctlFlags describes a command's options: name (with its dashes) to
// whether it takes a value.
type ctlFlags map[string]bool

// ctlOpt is one option as given, in command-line order (bitmap's actions
// apply in that order).
type ctlOpt struct{ name, value string }

// ctlLine is a parsed command line.
type ctlLine struct {
	cmd      string
	opts     []ctlOpt
	operands []string
}

// has reports whether the option was given; value returns its last value.
func (l *ctlLine) has(name string) bool {
	_, ok := l.value(name)
	return ok
}

func (l *ctlLine) value(name string) (string, bool) {
	v, ok := "", false
	for _, o := range l.opts {
		if o.name == name {
			v, ok = o.value, true
		}
	}
	return v, ok
}

// ctlCommands are the commands ctl knows and their options.
var ctlCommands = map[string]ctlFlags{
	"commit":   {"-b": true, "-d": false, "-r": true},
	"rebase":   {"-u": false, "-b": true, "-F": true},
	"resize":   {"--shrink": false, "--preallocation": true},
	"snapshot": {"-c": true, "-a": true, "-d": true},
	"convert":  {"-c": false, "-O": true, "-o": true, "-r": true},
	"amend":    {"-o": true, "--force": false, "--object": true},
	"bitmap": {"--add": false, "--remove": false, "--clear": false, "--enable": false,
		"--disable": false, "--merge": true, "-g": true},
	"check": {"-r": true},
}

// parseCtl splits a command line into command, options and operands.
// Options and operands may be mixed, as getopt permutes them; resize's
// size is always the last field, so that "-1G" is not an option (as
// img_resize takes it off argv before getopt).
func parseCtl(line string) (*ctlLine, error) {
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	if strings.ContainsAny(line, "\n\x00") {
		return nil, usagef("one command line per write")
	}
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return nil, usagef("empty command")
	}
	l := &ctlLine{cmd: fields[0]}
	flags, ok := ctlCommands[l.cmd]
	if !ok {
		return nil, usagef("unknown command '%s'", l.cmd)
	}
	args := fields[1:]
	if l.cmd == "resize" {
		if len(args) == 0 {
			return nil, usagef("resize: missing size")
		}
		l.operands = []string{args[len(args)-1]}
		args = args[:len(args)-1]
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			l.operands = append(l.operands, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			l.operands = append(l.operands, a)
			continue
		}
		takesValue, known := flags[a]
		if !known {
			return nil, usagef("%s: unknown option '%s'", l.cmd, a)
		}
		o := ctlOpt{name: a}
		if takesValue {
			if i+1 >= len(args) {
				return nil, usagef("%s: option '%s' needs a value", l.cmd, a)
			}
			i++
			o.value = args[i]
		}
		l.opts = append(l.opts, o)
	}
	return l, nil
}

// rateLimit is -r RATE in bytes per second, 0 without it.
func (l *ctlLine) rateLimit() (int64, error) {
	v, ok := l.value("-r")
	if !ok {
		return 0, nil
	}
	n, err := formats.ParseSize(v)
	if err != nil || n > math.MaxInt64 {
		return 0, usagef("%s: invalid rate limit '%s'", l.cmd, v)
	}
	return int64(n), nil
}

// wantOperands checks the operand count.
func (l *ctlLine) wantOperands(n int, what string) error {
	if len(l.operands) != n {
		if len(l.operands) > n {
			return usagef("%s: unexpected argument '%s'", l.cmd, l.operands[n])
		}
		return usagef("%s: expecting %s", l.cmd, what)
	}
	return nil
}

// ctlNode is the write-only `ctl` file.
type ctlNode struct {
	gofs.Inode
	dir *imageDir
	st  *opState
}

var (
	_ gofs.NodeGetattrer = (*ctlNode)(nil)
	_ gofs.NodeSetattrer = (*ctlNode)(nil)
	_ gofs.NodeOpener    = (*ctlNode)(nil)
)

// ctlHandle is one open of ctl.
type ctlHandle struct{ node *ctlNode }

var _ gofs.FileWriter = (*ctlHandle)(nil)

func (n *ctlNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fillAttr(&out.Attr)
	return 0
}

func (n *ctlNode) fillAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o200
	if n.dir.t.readOnly {
		a.Mode = syscall.S_IFREG
	}
	key, err := statFile(n.dir.path)
	if err != nil {
		key = n.dir.key
	}
	setHostAttr(a, key)
}

func (n *ctlNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	switch {
	case flags&syscall.O_ACCMODE != syscall.O_WRONLY:
		return nil, 0, syscall.EACCES
	case n.dir.t.readOnly:
		return nil, 0, syscall.EROFS
	}
	return &ctlHandle{node: n}, fuse.FOPEN_DIRECT_IO, 0
}

// Setattr accepts what `echo cmd > ctl` and touch send (a truncation to
// nothing, times) and changes nothing.
func (n *ctlNode) Setattr(ctx context.Context, _ gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	if sz, ok := in.GetSize(); ok && sz != 0 {
		return syscall.EINVAL
	}
	n.fillAttr(&out.Attr)
	return 0
}

// Write runs one command line and returns when it is done. A failure
// fails the write; its message is in status.
func (h *ctlHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	n := h.node
	l, err := parseCtl(string(data))
	// status names the command even when the line is refused.
	name := ""
	if f := strings.Fields(string(data)); len(f) > 0 {
		name = f[0]
	}
	n.st.begin(name)
	if err == nil {
		err = n.dir.runCtl(ctx, l, n.st)
	}
	n.st.end(err)
	if err != nil {
		n.dir.t.logf("imgfs: %s: ctl %q: %v", n.dir.path, redactSecrets(strings.TrimSpace(string(data))), err)
		return 0, Errno(err)
	}
	return uint32(len(data)), 0
}

// runCtl runs a parsed command line on the image.
func (d *imageDir) runCtl(ctx context.Context, l *ctlLine, st *opState) error {
	switch l.cmd {
	case "commit":
		return d.ctlCommit(ctx, l, st)
	case "rebase":
		return d.ctlRebase(ctx, l, st)
	case "resize":
		return d.ctlResize(l)
	case "snapshot":
		return d.ctlSnapshot(l)
	case "convert":
		return d.ctlConvert(ctx, l, st)
	case "amend":
		return d.ctlAmend(l, st)
	case "bitmap":
		return d.ctlBitmap(l)
	case "check":
		return d.ctlCheck(ctx, l)
	}
	return usagef("unknown command '%s'", l.cmd)
}

func (d *imageDir) ctlResize(l *ctlLine) error {
	if err := l.wantOperands(1, "a size"); err != nil {
		return err
	}
	size, err := control.ParseResizeSize(l.operands[0])
	if err != nil {
		return formats.Errorf(errUsage, "resize: invalid size '%s': %v", l.operands[0], err)
	}
	prealloc, _ := l.value("--preallocation")
	if prealloc != "" && !control.ValidPrealloc(prealloc) {
		return usagef("resize: invalid preallocation mode '%s'", prealloc)
	}
	return d.modify(true, func(img formats.Image) error {
		return control.Resize(control.ResizeOptions{Image: img, Size: size, Prealloc: prealloc, Shrink: l.has("--shrink")})
	})
}

func (d *imageDir) ctlSnapshot(l *ctlLine) error {
	if err := l.wantOperands(0, ""); err != nil {
		return err
	}
	if len(l.opts) != 1 {
		return usagef("snapshot: give exactly one of -c, -a, -d")
	}
	o := control.SnapshotOptions{Name: l.opts[0].value}
	switch l.opts[0].name {
	case "-c":
		o.Action = control.SnapshotCreate
	case "-a":
		o.Action = control.SnapshotApply
	case "-d":
		o.Action = control.SnapshotDelete
	}
	// Only applying one changes what disk reads.
	return d.modify(o.Action == control.SnapshotApply, func(img formats.Image) error {
		o.Image = img
		_, err := control.Snapshot(o)
		return err
	})
}

func (d *imageDir) ctlAmend(l *ctlLine, st *opState) error {
	opts, ok := l.value("-o")
	if err := l.wantOperands(0, ""); err != nil {
		return err
	}
	if !ok {
		return formats.Errorf(errUsage, "amend: %v", control.ErrAmendNoOptions)
	}
	secrets, err := d.ctlSecrets(l)
	if err != nil {
		return err
	}
	return d.modify(true, func(img formats.Image) error {
		return control.Amend(control.AmendOptions{Image: img, Options: opts, Force: l.has("--force"),
			Secrets: secrets, Progress: st.progress()})
	})
}

// secretProps are the properties of a ctl line's secret object.
var secretProps = []formats.OptionSpec{
	{Name: "id", Type: formats.OptString},
	{Name: "data", Type: formats.OptString},
	{Name: "file", Type: formats.OptString},
}

// ctlSecrets returns the secrets a line's options may name, by id: the
// mount's passphrase and the line's --object definitions.
func (d *imageDir) ctlSecrets(l *ctlLine) (map[string][]byte, error) {
	secrets := maps.Clone(d.t.src.secrets)
	if secrets == nil {
		secrets = map[string][]byte{}
	}
	for _, o := range l.opts {
		if o.name != "--object" {
			continue
		}
		def, ok := strings.CutPrefix(o.value, "secret,")
		if !ok {
			return nil, usagef("%s: --object takes secret,id=ID,data=DATA|file=PATH", l.cmd)
		}
		props := formats.NewOptions(secretProps)
		if err := props.Parse(def); err != nil {
			return nil, formats.Errorf(errUsage, "%s: --object: %v", l.cmd, err)
		}
		id := props.String("id")
		_, dup := secrets[id]
		switch {
		case id == "":
			return nil, usagef("%s: --object: Parameter 'id' is missing", l.cmd)
		case dup:
			return nil, usagef("%s: --object: secret '%s' is defined already", l.cmd, id)
		case props.Has("data") && props.Has("file"):
			return nil, usagef("%s: --object: 'data' and 'file' are mutually exclusive", l.cmd)
		case props.Has("data"):
			secrets[id] = []byte(props.String("data"))
		case props.Has("file"):
			data, err := d.readSecretFile(props.String("file"))
			if err != nil {
				return nil, err
			}
			secrets[id] = data
		default:
			return nil, usagef("%s: --object: Either 'file' or 'data' must be provided", l.cmd)
		}
	}
	return secrets, nil
}

// maxSecretFile bounds what a secret file may hold: a passphrase, not
// a file the mount reads whole into memory.
const maxSecretFile = 1 << 20

// readSecretFile reads a secret object's file, with convert's rule for
// paths outside the mounted directory.
func (d *imageDir) readSecretFile(name string) ([]byte, error) {
	path := name
	if !filepath.IsAbs(path) {
		path = filepath.Join(d.t.src.dir, path)
	}
	if !d.t.src.allowOutside && !d.t.src.inside(path) {
		return nil, formats.Errorf(errOutside, "secret file '%s' is outside the mounted directory %s", name, d.t.src.dir)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxSecretFile {
		return nil, formats.Errorf(errUsage, "secret file '%s' is larger than %d bytes", name, maxSecretFile)
	}
	return data, nil
}

// redactSecrets hides the definitions of --object in a command line
// before it is logged: they may carry passphrases.
func redactSecrets(line string) string {
	fields := strings.Fields(line)
	for i := 1; i < len(fields); i++ {
		if fields[i-1] == "--object" {
			fields[i] = "(secret)"
		}
	}
	return strings.Join(fields, " ")
}

func (d *imageDir) ctlBitmap(l *ctlLine) error {
	if err := l.wantOperands(1, "a bitmap name"); err != nil {
		return err
	}
	o := control.BitmapOptions{Bitmap: l.operands[0]}
	for _, opt := range l.opts {
		if opt.name == "-g" {
			g, err := formats.ParseSize(opt.value)
			if err != nil || g > 1<<31 {
				return usagef("bitmap: invalid granularity '%s'", opt.value)
			}
			o.Granularity = int64(g)
			continue
		}
		o.Actions = append(o.Actions, control.BitmapAction{Op: strings.TrimPrefix(opt.name, "--"), Source: opt.value})
	}
	if len(o.Actions) == 0 {
		return usagef("bitmap: need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
	}
	return d.modify(false, func(img formats.Image) error {
		o.Image = img
		return control.Bitmap(o)
	})
}

func (d *imageDir) ctlCheck(ctx context.Context, l *ctlLine) error {
	if err := l.wantOperands(0, ""); err != nil {
		return err
	}
	var mode formats.CheckMode
	switch v, _ := l.value("-r"); v {
	case "leaks":
		mode = formats.CheckFixLeaks
	case "all":
		mode = formats.CheckFixAll
	default:
		return usagef("check: -r takes leaks or all")
	}
	return d.modify(true, func(img formats.Image) error {
		rep, err := control.Check(ctx, control.CheckOptions{Image: img, Filename: d.path, Mode: mode})
		if err == nil && rep.CheckErrors != 0 {
			err = formats.Errorf(formats.ErrCorrupt, "%d errors remain after the repair", rep.CheckErrors)
		}
		return err
	})
}

// modify runs fn on the shared open image, opened read-write, then
// flushes it and makes the kernel and the reports forget what they
// cached. content says whether fn may change what disk reads or its
// size; other changes (snapshot tables, bitmaps) only touch reports.
func (d *imageDir) modify(content bool, fn func(formats.Image) error) error {
	err := d.withWritable(fn)
	d.changed()
	if content {
		d.dropDiskCache()
	}
	return err
}

// withWritable runs fn on the shared image, read-write (acquire may
// reopen it so), and flushes it.
func (d *imageDir) withWritable(fn func(formats.Image) error) error {
	if _, err := d.acquire(true); err != nil {
		return err
	}
	defer d.release()
	return d.withImage(func(img formats.Image) error {
		err := fn(img)
		if ferr := img.Flush(); err == nil {
			err = ferr
		}
		return err
	})
}

// dropDiskCache makes the kernel forget disk's pages and attributes
// (its size) before the ctl write returns, so that the next read after
// it sees the change. Unlike notifyContent it waits: it runs from a
// request on another inode, holding none of the mount's locks, so a
// disk read the kernel may wait for can be served meanwhile.
func (d *imageDir) dropDiskCache() {
	if d.disk != nil {
		d.disk.NotifyContent(0, 0)
	}
}

// errOpen tags the refusal of commit and rebase while the image is open
// in the mount; it carries EBUSY.
var errOpen = fmt.Errorf("the image is open in the mount (close disk first): %w", syscall.EBUSY)

// exclusive runs fn while the mount has the image closed and nobody can
// open it: d.mu is held throughout, so opens of disk and reports wait.
// commit and rebase need it because they open the image (and its chain)
// themselves, as the command line does, and must not share it.
func (d *imageDir) exclusive(fn func() error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.waitClosedLocked() {
		return errOpen
	}
	ce := d.t.src.chain(d.path)
	if ce.err != nil {
		return ce.err
	}
	if !d.mayWrite(ce.key) {
		return formats.Errorf(formats.ErrReadOnly, "%s is read-only in the mount", d.name)
	}
	return fn()
}

// siblingsChanged tells every image directory of the mount that its
// image may have changed: commit writes into a backing image, and
// rebase changes what a chain reads.
func (d *imageDir) siblingsChanged() {
	_, parent := d.Parent()
	if parent == nil {
		return
	}
	for _, ch := range parent.Children() {
		if s, ok := ch.Operations().(*imageDir); ok {
			s.changed()
			s.dropDiskCache()
		}
	}
}

// siblingOpen reports whether path is an image of the mount that the
// mount has open (after waiting releaseWait for it to close): convert
// must not recreate it under its readers.
func (d *imageDir) siblingOpen(path string) bool {
	_, parent := d.Parent()
	if parent == nil || filepath.Dir(filepath.Clean(path)) != d.t.src.dir {
		return false
	}
	ch := parent.GetChild(filepath.Base(path))
	if ch == nil {
		return false
	}
	s, ok := ch.Operations().(*imageDir)
	if !ok {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.waitClosedLocked()
}

func (d *imageDir) ctlCommit(ctx context.Context, l *ctlLine, st *opState) error {
	if err := l.wantOperands(0, ""); err != nil {
		return err
	}
	base, hasBase := l.value("-b")
	rate, err := l.rateLimit()
	if err != nil {
		return err
	}
	defer d.siblingsChanged()
	return d.exclusive(func() error {
		top, err := d.t.src.open(d.path, formats.OpenOptions{})
		if err != nil {
			return err
		}
		format := top.Format() // Commit closes top before it reopens it
		return control.Commit(ctx, control.CommitOptions{
			Top:      top,
			Filename: d.path,
			ReopenTop: func() (formats.Image, error) {
				return d.t.src.open(d.path, formats.OpenOptions{Format: format, NoBacking: true})
			},
			Base:      base,
			Drop:      l.has("-d") || hasBase,
			RateLimit: rate,
			Progress:  st.progress(),
		})
	})
}

func (d *imageDir) ctlRebase(ctx context.Context, l *ctlLine, st *opState) error {
	if err := l.wantOperands(0, ""); err != nil {
		return err
	}
	backing, hasBacking := l.value("-b")
	unsafe := l.has("-u")
	if !hasBacking && !unsafe {
		return usagef("rebase: -b BACKING is required without -u")
	}
	if backing != "" && !d.t.src.allowOutside && !d.t.src.inside(formats.BackingPath(d.path, backing)) {
		return formats.Errorf(errOutside, "backing file '%s' is outside the mounted directory %s", backing, d.t.src.dir)
	}
	fmtName, _ := l.value("-F")
	defer d.siblingsChanged()
	return d.exclusive(func() error {
		img, err := d.t.src.open(d.path, formats.OpenOptions{NoBacking: unsafe})
		if err != nil {
			return err
		}
		defer img.Close()
		return control.Rebase(ctx, control.RebaseOptions{
			Image: img, Backing: backing, BackingGiven: hasBacking, BackingFormat: fmtName, Unsafe: unsafe,
			OpenBacking: func(path, format string) (formats.Image, error) {
				return d.t.src.open(path, formats.OpenOptions{Format: format, ReadOnly: true})
			},
			Progress: func(_, pieces int64) {
				if pieces > 0 {
					st.addPercent(100 / float64(pieces))
				}
			},
		})
	})
}

func (d *imageDir) ctlConvert(ctx context.Context, l *ctlLine, st *opState) error {
	if err := l.wantOperands(1, "an output file"); err != nil {
		return err
	}
	outFmt, ok := l.value("-O")
	if !ok {
		return usagef("convert: -O FMT is required")
	}
	target := l.operands[0]
	if !filepath.IsAbs(target) {
		target = filepath.Join(d.t.src.dir, target)
	}
	if !d.t.src.allowOutside && !d.t.src.inside(target) {
		return formats.Errorf(errOutside, "output '%s' is outside the mounted directory %s", l.operands[0], d.t.src.dir)
	}
	if filepath.Clean(target) == d.path {
		return usagef("convert: the output is the image itself")
	}
	if d.siblingOpen(target) {
		return errOpen
	}
	opts, _ := l.value("-o")
	rate, err := l.rateLimit()
	if err != nil {
		return err
	}
	return d.use(formats.OpenOptions{ReadOnly: true, ForceShare: true}, func(img formats.Image) error {
		return control.Convert(ctx, control.ConvertOptions{
			Sources: []formats.Image{img}, Target: target, TargetFormat: outFmt, Options: opts,
			Compressed: l.has("-c"), SparseSize: control.DefaultSparseSize, Workers: control.DefaultWorkers,
			RateLimit: rate, Progress: st.progress(),
		})
	})
}
