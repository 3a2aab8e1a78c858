package fs

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/imgfs/imgfs/formats"
)

// source is the directory (or single image file) a mount serves. It
// decides which files are images and what their backing chains are,
// caching both per file version so a directory listing costs a stat per
// file. Safe for concurrent use.
type source struct {
	// dir is SOURCE's directory, absolute; single is the base name when
	// SOURCE is one image file, "" otherwise.
	dir, single string
	// realDir is dir with symlinks resolved, the boundary that backing
	// and data files must stay inside.
	realDir      string
	allowOutside bool
	// secrets and keySecret are the OpenOptions fields that unlock
	// encrypted images (nil and "" when the mount has no passphrase).
	secrets   map[string][]byte
	keySecret string

	mu sync.Mutex // guards probes and chains
	// probes: base name -> whether the file version is an image.
	probes map[string]probeEntry
	// chains: absolute path -> the files its backing chain uses.
	chains map[string]chainEntry
}

// fileKey identifies one version of a host file: a change of content
// through any path changes the modification or change time, and a
// replaced file has a new inode.
type fileKey struct {
	dev, ino            uint64
	size, blocks        int64
	mtime, ctime, atime int64
	// writable: this process may open the file for writing.
	writable bool
}

type probeEntry struct {
	key   fileKey
	image bool
	// readOnly: the format is one imgfs only reads (dmg, bochs, cloop).
	readOnly bool
}

// chainEntry is what opening a file's image would touch besides the file
// itself: its backing files (resolved, in chain order, with their paths)
// and whether one of them, or a data file, is refused.
type chainEntry struct {
	key   fileKey
	files []fileKey
	paths []string
	// extents are the other files the top image keeps its data in (a
	// split VMDK's extents), by absolute path.
	extents []string
	err     error
}

// current reports whether the files of the entry are all as they were
// when it was made: a backing file written or replaced on the host, or
// one with a different backing file of its own, makes it stale.
func (e chainEntry) current(key fileKey) bool {
	if !e.key.same(key) {
		return false
	}
	for i, p := range e.paths {
		k, err := statFile(p)
		if err != nil || !k.same(e.files[i]) {
			return false
		}
	}
	return true
}

// sameVersion reports whether two entries describe the same version of
// every file of the chain: what the chain reads has not changed on the
// host in between.
func (e chainEntry) sameVersion(o chainEntry) bool {
	if !e.key.same(o.key) || len(e.files) != len(o.files) {
		return false
	}
	for i := range e.files {
		if !e.files[i].same(o.files[i]) {
			return false
		}
	}
	return true
}

func newSource(path string, allowOutside bool, passphrase []byte) (*source, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return nil, err
	}
	s := &source{dir: abs, allowOutside: allowOutside,
		probes: map[string]probeEntry{}, chains: map[string]chainEntry{}}
	if passphrase != nil {
		s.secrets, s.keySecret = map[string][]byte{passphraseID: passphrase}, passphraseID
	}
	switch {
	case st.Mode().IsRegular():
		// A single image is shown whatever its content: naming it is
		// the user's statement that it is an image. Its directory is
		// the boundary for backing files.
		s.dir, s.single = filepath.Dir(abs), filepath.Base(abs)
	case !st.IsDir():
		return nil, fmt.Errorf("%s: not a directory or a regular file", path)
	}
	if s.realDir, err = filepath.EvalSymlinks(s.dir); err != nil {
		return nil, err
	}
	return s, nil
}

// passphraseID is the secret id under which the mount hands its
// passphrase to the drivers, as `--object secret,id=ID` would.
const passphraseID = "imgfs-mount-key"

// statFile returns the key of the file at path, following symlinks.
func statFile(path string) (fileKey, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileKey{}, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fileKey{}, unix.ENOENT
	}
	return fileKey{
		dev: st.Dev, ino: st.Ino, size: st.Size, blocks: st.Blocks,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(), atime: st.Atim.Nano(),
		writable: unix.Access(path, unix.W_OK) == nil,
	}, nil
}

// same reports whether a and b are the same version of the same file.
func (a fileKey) same(b fileKey) bool {
	return a.dev == b.dev && a.ino == b.ino && a.size == b.size && a.mtime == b.mtime && a.ctime == b.ctime
}

func (a fileKey) sameFile(b fileKey) bool { return a.dev == b.dev && a.ino == b.ino }

// rawExtensions are the names under which a file that no format driver
// claims is still shown as a raw image. Every file probes as raw, so
// without this rule every text file and archive in SOURCE would become
// a "disk".
var rawExtensions = []string{".img", ".raw", ".iso", ".bin"}

// isImageFile is the rule for what the mount shows: a file some driver
// other than raw recognises, or a file of whole 512-byte sectors named
// like a raw image.
func isImageFile(d *formats.Driver, name string, size int64) bool {
	if d.Name != "raw" {
		return true
	}
	ext := strings.ToLower(filepath.Ext(name))
	return size > 0 && size%512 == 0 && slices.Contains(rawExtensions, ext)
}

// path is the host path of the image called name.
func (s *source) path(name string) string { return filepath.Join(s.dir, name) }

// lookup reports whether name is an image in SOURCE now, and its key.
func (s *source) lookup(name string) (fileKey, bool) {
	if name == "" || strings.ContainsRune(name, '/') || (s.single != "" && name != s.single) {
		return fileKey{}, false
	}
	key, err := statFile(s.path(name))
	if err != nil {
		return fileKey{}, false
	}
	s.mu.Lock()
	e, ok := s.probes[name]
	s.mu.Unlock()
	if ok && e.key.same(key) {
		return key, e.image
	}
	e = s.probe(name, key)
	s.mu.Lock()
	s.probes[name] = e
	s.mu.Unlock()
	return key, e.image
}

// probe reads the head of the file and applies isImageFile.
func (s *source) probe(name string, key fileKey) probeEntry {
	e := probeEntry{key: key, image: s.single != ""}
	f, err := formats.OpenFile(s.path(name), true, false)
	if err != nil {
		return e
	}
	defer f.Close()
	d, err := formats.ProbeFile(f)
	if err != nil {
		return e
	}
	e.image = e.image || isImageFile(d, name, key.size) || d.Name == "raw" && hasVHDFooter(f)
	e.readOnly = d.ReadOnly
	return e
}

// readOnlyFormat reports whether the image called name is of a format
// imgfs cannot write, as its last lookup found.
func (s *source) readOnlyFormat(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.probes[name].readOnly
}

// list returns the names of the images the mount shows, sorted: the
// images in SOURCE but those that are part of another one.
func (s *source) list() ([]string, error) {
	all, err := s.images()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range all {
		if !s.partOfAnother(n, all) {
			out = append(out, n)
		}
	}
	return out, nil
}

// show reports whether the mount shows name, and its key: list's rule
// for one name.
func (s *source) show(name string) (fileKey, bool) {
	key, ok := s.lookup(name)
	if !ok || s.single != "" || s.chain(s.path(name)).err == nil {
		return key, ok
	}
	all, err := s.images()
	return key, err != nil || !s.partOfAnother(name, all)
}

// partOfAnother reports whether the image called name cannot be opened
// on its own because another image of names keeps data in it (an extent
// of a split VMDK): it is a part of that image, not an image.
func (s *source) partOfAnother(name string, names []string) bool {
	path := s.path(name)
	if s.single != "" || s.chain(path).err == nil {
		return false
	}
	for _, n := range names {
		if n != name && slices.Contains(s.chain(s.path(n)).extents, path) {
			return true
		}
	}
	return false
}

// images returns the names of the images in SOURCE, sorted, and forgets
// cached results of files that are gone.
func (s *source) images() ([]string, error) {
	var names []string
	if s.single != "" {
		names = []string{s.single}
	} else {
		ents, err := os.ReadDir(s.dir)
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			names = append(names, e.Name())
		}
	}
	var out []string
	present := map[string]bool{}
	for _, n := range names {
		present[n] = true
		if _, ok := s.lookup(n); ok {
			out = append(out, n)
		}
	}
	s.mu.Lock()
	for n := range s.probes {
		if !present[n] {
			delete(s.probes, n)
			delete(s.chains, s.path(n))
		}
	}
	s.mu.Unlock()
	sort.Strings(out)
	return out, nil
}

// inside reports whether path, with symlinks resolved as far as it
// exists, lies in SOURCE's directory.
func (s *source) inside(path string) bool {
	p := filepath.Clean(path)
	if r, err := filepath.EvalSymlinks(p); err == nil {
		p = r
	}
	return p == s.realDir || strings.HasPrefix(p, s.realDir+string(filepath.Separator))
}

// peekOptions open an image only to read its header: read-only, without
// its backing chain, and without keeping anyone else from using it
// (qemu-img's -U), so that listing the mount never conflicts with a VM.
var peekOptions = formats.OpenOptions{ReadOnly: true, NoBacking: true, NoIO: true, ForceShare: true}

// chain returns the files path's backing chain uses, refusing (err set)
// a backing or data file outside SOURCE unless allowed. Cached per
// version of every file of the chain.
func (s *source) chain(path string) chainEntry {
	key, err := statFile(path)
	if err != nil {
		return chainEntry{err: err}
	}
	s.mu.Lock()
	e, ok := s.chains[path]
	s.mu.Unlock()
	if ok && e.current(key) {
		return e
	}
	e = chainEntry{key: key}
	e.files, e.paths, e.extents, e.err = s.walkChain(path)
	s.mu.Lock()
	s.chains[path] = e
	s.mu.Unlock()
	return e
}

// walkChain follows backing file names from the header of path down,
// as formats.Open would, checking each resolved name, each data file and
// each extent file against SOURCE. extents are the top image's.
func (s *source) walkChain(path string) (files []fileKey, paths, extents []string, err error) {
	cur := path
	for depth := 0; depth <= formats.MaxChainDepth; depth++ {
		img, err := s.open(cur, peekOptions)
		if err != nil {
			if cur == path {
				return files, paths, extents, err
			}
			// A missing or broken backing file is reported when the
			// chain is opened; it cannot be outside SOURCE here.
			return files, paths, extents, nil
		}
		var name string
		if b, ok := img.(formats.Backed); ok {
			name, _ = b.BackingInfo()
		}
		dataFile, exts := otherFiles(img)
		if cur == path {
			extents = exts
		}
		img.Close()
		for _, x := range exts {
			if !s.allowOutside && !s.inside(x) {
				return files, paths, extents, formats.Errorf(errOutside,
					"extent file '%s' of '%s' is outside the mounted directory %s (mount with -o allow_outside to allow it)",
					x, cur, s.dir)
			}
		}
		if dataFile != "" && !s.allowOutside && !s.inside(formats.BackingPath(cur, dataFile)) {
			return files, paths, extents, formats.Errorf(errOutside,
				"data file '%s' of '%s' is outside the mounted directory %s (mount with -o allow_outside to allow it)",
				dataFile, cur, s.dir)
		}
		if name == "" {
			return files, paths, extents, nil
		}
		next := formats.BackingPath(cur, name)
		if !s.allowOutside && !s.inside(next) {
			return files, paths, extents, formats.Errorf(errOutside,
				"backing file '%s' of '%s' resolves to '%s', outside the mounted directory %s (mount with -o allow_outside to allow it)",
				name, cur, next, s.dir)
		}
		k, err := statFile(next)
		if err != nil {
			return files, paths, extents, nil
		}
		for _, f := range files {
			if f.sameFile(k) {
				return files, paths, extents, nil // a loop; formats.Open refuses it
			}
		}
		files, paths = append(files, k), append(paths, next)
		cur = next
	}
	return files, paths, extents, nil
}

// otherFiles are the files besides its own that img keeps guest data
// in, as its format specific information names them: qcow2's external
// "data-file" ("" when none), and the "extents" of a VMDK other than
// the image's own file, by cleaned path.
func otherFiles(img formats.Image) (dataFile string, extents []string) {
	d, ok := img.(formats.Describer)
	if !ok {
		return "", nil
	}
	desc, err := d.Describe()
	if err != nil || desc.FormatSpecific == nil {
		return "", nil
	}
	data := desc.FormatSpecific.Data
	dataFile, _ = data.Get("data-file").(string)
	list, _ := data.Get("extents").([]any)
	for _, e := range list {
		o, ok := e.(formats.Object)
		if !ok {
			continue
		}
		if name, _ := o.Get("filename").(string); name != "" && filepath.Clean(name) != filepath.Clean(img.Filename()) {
			extents = append(extents, filepath.Clean(name))
		}
	}
	return dataFile, extents
}

// backsAnother reports whether some other image in SOURCE has the file
// key in its backing chain; such a file must not be written through the
// mount, which would change the other image's content under it.
func (s *source) backsAnother(path string, key fileKey) bool {
	names, err := s.list()
	if err != nil {
		return false
	}
	for _, n := range names {
		p := s.path(n)
		if p == path {
			continue
		}
		for _, f := range s.chain(p).files {
			if f.sameFile(key) {
				return true
			}
		}
	}
	return false
}
