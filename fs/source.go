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
}

// chainEntry is what opening a file's image would touch besides the file
// itself: its backing files (resolved, in chain order) and whether one
// of them, or a data file, is refused.
type chainEntry struct {
	key   fileKey
	files []fileKey
	err   error
}

func newSource(path string, allowOutside bool) (*source, error) {
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
	image := s.single != "" || s.probe(name, key.size)
	s.mu.Lock()
	s.probes[name] = probeEntry{key: key, image: image}
	s.mu.Unlock()
	return key, image
}

// probe reads the head of the file and applies isImageFile.
func (s *source) probe(name string, size int64) bool {
	f, err := formats.OpenFile(s.path(name), true, false)
	if err != nil {
		return false
	}
	defer f.Close()
	d, err := formats.ProbeFile(f)
	return err == nil && (isImageFile(d, name, size) || d.Name == "raw" && hasVHDFooter(f))
}

// list returns the names of the images in SOURCE, sorted, and forgets
// cached results of files that are gone.
func (s *source) list() ([]string, error) {
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
// version of the top file.
func (s *source) chain(path string) chainEntry {
	key, err := statFile(path)
	if err != nil {
		return chainEntry{err: err}
	}
	s.mu.Lock()
	e, ok := s.chains[path]
	s.mu.Unlock()
	if ok && e.key.same(key) {
		return e
	}
	e = chainEntry{key: key}
	e.files, e.err = s.walkChain(path)
	s.mu.Lock()
	s.chains[path] = e
	s.mu.Unlock()
	return e
}

// walkChain follows backing file names from the header of path down,
// as formats.Open would, checking each resolved name and each data file
// against SOURCE.
func (s *source) walkChain(path string) ([]fileKey, error) {
	var files []fileKey
	cur := path
	for depth := 0; depth <= formats.MaxChainDepth; depth++ {
		img, err := openImage(cur, peekOptions)
		if err != nil {
			if cur == path {
				return files, err
			}
			// A missing or broken backing file is reported when the
			// chain is opened; it cannot be outside SOURCE here.
			return files, nil
		}
		var name string
		if b, ok := img.(formats.Backed); ok {
			name, _ = b.BackingInfo()
		}
		dataFile := externalDataFile(img)
		img.Close()
		if dataFile != "" && !s.allowOutside && !s.inside(formats.BackingPath(cur, dataFile)) {
			return files, formats.Errorf(errOutside,
				"data file '%s' of '%s' is outside the mounted directory %s (mount with -o allow_outside to allow it)",
				dataFile, cur, s.dir)
		}
		if name == "" {
			return files, nil
		}
		next := formats.BackingPath(cur, name)
		if !s.allowOutside && !s.inside(next) {
			return files, formats.Errorf(errOutside,
				"backing file '%s' of '%s' resolves to '%s', outside the mounted directory %s (mount with -o allow_outside to allow it)",
				name, cur, next, s.dir)
		}
		k, err := statFile(next)
		if err != nil {
			return files, nil
		}
		for _, f := range files {
			if f.sameFile(k) {
				return files, nil // a loop; formats.Open refuses it
			}
		}
		files = append(files, k)
		cur = next
	}
	return files, nil
}

// externalDataFile is the data file an image names in its format
// specific information (qcow2's "data-file"), "" when none.
func externalDataFile(img formats.Image) string {
	d, ok := img.(formats.Describer)
	if !ok {
		return ""
	}
	desc, err := d.Describe()
	if err != nil || desc.FormatSpecific == nil {
		return ""
	}
	name, _ := desc.FormatSpecific.Data.Get("data-file").(string)
	return name
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
