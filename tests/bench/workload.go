package main

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
)

// workloadVersion names what prepareWorkload makes; change it whenever
// that changes, so that cached workloads are made anew.
const workloadVersion = "1"

// fileRoots are the system directories whose files fill the guest
// filesystem and the tarball, taken in this order until the budget is
// reached: real files, compressible as real guests' are.
var fileRoots = []string{"/usr/share", "/usr/lib", "/usr/bin", "/usr/local/go"}

// sparseSize is the virtual size of the images that show whether costs
// follow the data or the virtual size.
const sparseSize = 16 << 40

// scatteredClusters is how many clusters the scattered sparse image has.
const scatteredClusters = 10000

// workload is the set of images and files the scenarios read. Every
// file is made by qemu-img (or qemu-io), the reference, never by imgfs.
type workload struct {
	dir  string
	size int64 // the raw disk's size

	raw     string // ext4 filled to about half with real files
	qcow2   string // raw as qcow2
	deflate string // raw as deflate-compressed qcow2
	zstd    string // raw as zstd-compressed qcow2
	vmdk    string // raw as monolithicSparse vmdk
	vhdx    string // raw as vhdx
	tarball string // size/4 of real files, extracted by the FUSE write scenario

	empty, empty2           string // empty 16 TiB qcow2s
	scattered, scattered2   string // 16 TiB qcow2s with scatteredClusters clusters, the second a convert of the first
	files                   int    // regular files copied into raw
	fileBytes, tarballBytes int64
}

// prepareWorkload makes (or finds from an earlier run) the workload for
// a disk of size bytes under work. Each file is made under a temporary
// name and renamed when complete, so an interrupted run leaves nothing
// that a later one would take for finished.
func prepareWorkload(ctx context.Context, t *tools, work string, size int64) (*workload, error) {
	dir := filepath.Join(work, fmt.Sprintf("workload-v%s-%s", workloadVersion, formatSize(size)))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	p := func(name string) string { return filepath.Join(dir, name) }
	w := &workload{
		dir: dir, size: size,
		raw: p("disk.raw"), qcow2: p("disk.qcow2"), deflate: p("disk-deflate.qcow2"),
		zstd: p("disk-zstd.qcow2"), vmdk: p("disk.vmdk"), vhdx: p("disk.vhdx"), tarball: p("files.tar"),
		empty: p("empty.qcow2"), empty2: p("empty2.qcow2"),
		scattered: p("scattered.qcow2"), scattered2: p("scattered2.qcow2"),
	}
	qemuImg := func(args ...string) func(string) error {
		return func(tmp string) error { return run(ctx, t.qemuImg, append(args, tmp)...) }
	}
	steps := []struct {
		path string
		make func(tmp string) error
	}{
		{w.raw, func(tmp string) error { return w.makeRaw(ctx, tmp) }},
		{w.qcow2, qemuImg("convert", "-O", "qcow2", w.raw)},
		{w.deflate, qemuImg("convert", "-c", "-O", "qcow2", w.raw)},
		{w.zstd, qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", w.raw)},
		{w.vmdk, qemuImg("convert", "-O", "vmdk", w.raw)},
		{w.vhdx, qemuImg("convert", "-O", "vhdx", w.raw)},
		{w.tarball, func(tmp string) error { return writeTarball(tmp, size/4) }},
		{w.empty, func(tmp string) error {
			return run(ctx, t.qemuImg, "create", "-q", "-f", "qcow2", tmp, fmt.Sprint(int64(sparseSize)))
		}},
		{w.empty2, func(tmp string) error {
			return run(ctx, t.qemuImg, "create", "-q", "-f", "qcow2", tmp, fmt.Sprint(int64(sparseSize)))
		}},
		{w.scattered, func(tmp string) error { return makeScattered(ctx, t, tmp) }},
		{w.scattered2, qemuImg("convert", "-O", "qcow2", w.scattered)},
	}
	for _, s := range steps {
		if _, err := os.Stat(s.path); err == nil {
			continue
		}
		fmt.Fprintf(os.Stderr, "bench: making %s\n", s.path)
		tmp := s.path + ".tmp"
		os.Remove(tmp)
		if err := s.make(tmp); err != nil {
			os.Remove(tmp)
			return nil, fmt.Errorf("making %s: %w", s.path, err)
		}
		if err := os.Rename(tmp, s.path); err != nil {
			return nil, err
		}
	}
	// What the guest filesystem and the tarball hold, for the report:
	// counted from the images, so a cached workload reports the same.
	var err error
	if w.files, w.fileBytes, err = w.countGuestFiles(ctx); err != nil {
		return nil, err
	}
	if st, err := os.Stat(w.tarball); err == nil {
		w.tarballBytes = st.Size()
	}
	return w, nil
}

// makeRaw makes an ext4 filesystem of w.size bytes in path and copies
// system files into it until they fill about half of it.
func (w *workload) makeRaw(ctx context.Context, path string) error {
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(path, w.size); err != nil {
		return err
	}
	if err := run(ctx, "mkfs.ext4", "-q", "-F", path); err != nil {
		return err
	}
	g, err := mountGuest(ctx, path, filepath.Join(w.dir, "mnt"), true)
	if err != nil {
		return err
	}
	err = walkBudget(fileRoots, w.size/2, func(src string, d fs.DirEntry) error {
		return copyEntry(src, filepath.Join(g.dir, src), d)
	})
	return errors.Join(err, g.close())
}

// countGuestFiles counts the regular files in the raw disk's filesystem.
func (w *workload) countGuestFiles(ctx context.Context) (int, int64, error) {
	g, err := mountGuest(ctx, w.raw, filepath.Join(w.dir, "mnt"), false)
	if err != nil {
		return 0, 0, err
	}
	var n int
	var total int64
	err = filepath.WalkDir(g.dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		n++
		total += info.Size()
		return nil
	})
	return n, total, errors.Join(err, g.close())
}

// walkBudget calls fn for the directories, regular files and symlinks
// under roots, in lexical order, until the regular files' sizes add up
// to budget. Files that vanish or cannot be read are passed over.
func walkBudget(roots []string, budget int64, fn func(path string, d fs.DirEntry) error) error {
	var total int64
	for _, root := range roots {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil // unreadable: pass over it
			}
			if total >= budget {
				return fs.SkipAll
			}
			switch {
			case d.Type().IsRegular():
				info, err := d.Info()
				if err != nil {
					return nil
				}
				total += info.Size()
			case d.IsDir(), d.Type()&fs.ModeSymlink != 0:
			default:
				return nil // devices, sockets, pipes
			}
			return fn(path, d)
		})
		if err != nil || total >= budget {
			return err
		}
	}
	return nil
}

// copyEntry copies one directory, regular file or symlink.
func copyEntry(src, dst string, d fs.DirEntry) error {
	info, err := d.Info()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	switch {
	case d.IsDir():
		return os.MkdirAll(dst, info.Mode().Perm())
	case d.Type()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		return os.Symlink(target, dst)
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, info.Mode().Perm())
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	return errors.Join(err, out.Close())
}

// writeTarball writes a tar of budget bytes of system files to path.
func writeTarball(path string, budget int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = walkBudget(fileRoots, budget, func(src string, d fs.DirEntry) error {
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if d.Type()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(src); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = strings.TrimPrefix(src, "/")
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		_, err = io.CopyN(tw, in, hdr.Size)
		return err
	})
	return errors.Join(err, tw.Close(), f.Close())
}

// makeScattered makes a 16 TiB qcow2 with 4 KiB written in each of
// scatteredClusters clusters spread over the whole disk, with qemu-io in
// one process (cache=unsafe: the file is flushed once at the end).
func makeScattered(ctx context.Context, t *tools, path string) error {
	if err := run(ctx, t.qemuImg, "create", "-q", "-f", "qcow2", path, fmt.Sprint(int64(sparseSize))); err != nil {
		return err
	}
	const cluster = 64 << 10
	rng := rand.New(rand.NewPCG(6, 6)) // the same image every time
	stride := int64(sparseSize / scatteredClusters / cluster)
	args := []string{"-t", "unsafe", "-f", "qcow2"}
	for i := range int64(scatteredClusters) {
		off := (i*stride+rng.Int64N(stride))*cluster + rng.Int64N(cluster/4096)*4096
		args = append(args, "-c", fmt.Sprintf("write -P %d %d 4k", 1+i%255, off))
	}
	args = append(args, "-c", "flush", path)
	return run(ctx, t.qemuIO, args...)
}
