package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// sample is what one run of one side measured, by metric name.
type sample map[string]float64

// side is one contender of a scenario; run measures it once (r counts
// the runs from 0).
type side struct {
	name string
	run  func(r int) (sample, error)
}

// scenario is one comparison: its sides run alternately, and each row
// of the report compares imgfs's median of one metric with a peer's.
type scenario struct {
	name  string
	sides []side
	rows  []row
	notes []string
}

type row struct {
	label  string // what the row measures, after the scenario's name
	metric string
	peer   string // the side imgfs is compared with
	unit   unit
	target target
	detail bool // memory, CPU and size rows go into the second table
}

type unit int

const (
	seconds unit = iota
	mbPerSec
	perSec
	byteCount
)

// target is a goal from the issue; met is nil where there is none.
type target struct {
	text string
	met  func(imgfs, peer float64) bool
}

// atMost and atLeast bound the ratio imgfs/peer.
func atMost(x float64) target {
	return target{fmt.Sprintf("≤ %g", x), func(i, p float64) bool { return i <= x*p }}
}

func atLeast(x float64) target {
	return target{fmt.Sprintf("≥ %g", x), func(i, p float64) bool { return i >= x*p }}
}

// under bounds imgfs's own time, whatever the peer's.
func under(d time.Duration) target {
	return target{fmt.Sprintf("imgfs < %v", d), func(i, _ float64) bool { return i < d.Seconds() }}
}

// rssTarget: a convert may use twice qemu-img's memory, and 64 MiB in
// any case.
var rssTarget = target{"≤ max(2× peer, 64 MiB)", func(i, p float64) bool { return i <= max(2*p, 64<<20) }}

var noTarget = target{text: "—"}

// Side names besides the FUSE servers'.
const (
	sideQemuImg = "qemu-img"
	sideLoopRaw = "loop raw"
)

// bench holds what every scenario needs.
type bench struct {
	ctx        context.Context
	t          *tools
	w          *workload
	scratch    string // outputs, mount points, the write scenario's image
	fioRuntime time.Duration
}

// scenarios lists every scenario in the order they run.
func (b *bench) scenarios() []*scenario {
	w := b.w
	copyTarget, compressTarget := atMost(1.0), atMost(1.05)
	return []*scenario{
		b.convert("convert/raw-qcow2", w.raw, "qcow2", copyTarget, noTarget, "-O", "qcow2"),
		b.convert("convert/qcow2-raw", w.qcow2, "raw", copyTarget, noTarget, "-O", "raw"),
		b.convert("convert/qcow2-vmdk", w.qcow2, "vmdk", copyTarget, noTarget, "-O", "vmdk"),
		b.convert("convert/qcow2-vdi", w.qcow2, "vdi", copyTarget, noTarget, "-O", "vdi"),
		b.convert("convert/qcow2-vhdx", w.qcow2, "vhdx", copyTarget, noTarget, "-O", "vhdx"),
		b.convert("convert/qcow2-vpc", w.qcow2, "vpc", copyTarget, noTarget, "-O", "vpc"),
		// Not in the list: reading the other two workload forms.
		b.convert("convert/vmdk-raw", w.vmdk, "raw", copyTarget, noTarget, "-O", "raw"),
		b.convert("convert/vhdx-raw", w.vhdx, "raw", copyTarget, noTarget, "-O", "raw"),
		b.convert("convert-c/deflate-qcow2", w.qcow2, "qcow2", atMost(0.5), compressTarget, "-c", "-O", "qcow2"),
		b.convert("convert-c/zstd-qcow2", w.qcow2, "qcow2", atMost(0.7), compressTarget,
			"-c", "-O", "qcow2", "-o", "compression_type=zstd"),
		b.convert("convert-c/stream-vmdk", w.qcow2, "vmdk", atMost(0.4), noTarget,
			"-c", "-O", "vmdk", "-o", "subformat=streamOptimized"),
		b.convert("convert/deflate-raw", w.deflate, "raw", atMost(0.8), noTarget, "-O", "raw"),
		b.convert("convert/zstd-raw", w.zstd, "raw", atMost(0.8), noTarget, "-O", "raw"),
		b.seqRead(),
		b.randRead(),
		b.tar(),
		b.write(),
		b.sparse("sparse/empty", w.empty, w.empty2),
		b.sparse("sparse/scattered", w.scattered, w.scattered2),
	}
}

// checkable are the output formats `qemu-img check` can check.
var checkable = map[string]bool{"qcow2": true, "vmdk": true, "vdi": true, "vhdx": true}

// convert compares `imgfs convert` with `qemu-img convert` on the same
// command line (-W -m 16 added): time, peak RSS and output size. Neither
// program syncs its output at the end (qemu-img's convert leaves the
// page cache to write back, and so does imgfs's), so neither is made
// to; dropCaches before each run writes back the previous output
// untimed, for both alike. Run 0's imgfs output is checked against the
// source with qemu-img compare and check.
func (b *bench) convert(name, src, ext string, timeTarget, sizeTarget target, args ...string) *scenario {
	s := &scenario{name: name}
	args = append([]string{"convert", "-W", "-m", "16"}, args...)
	one := func(who, bin string) side {
		return side{who, func(r int) (sample, error) {
			out := filepath.Join(b.scratch, "out-"+who+"."+ext)
			os.Remove(out)
			defer os.Remove(out)
			if err := dropCaches(); err != nil {
				return nil, err
			}
			res, err := measure(exec.CommandContext(b.ctx, bin, append(args, src, out)...))
			if err != nil {
				return nil, err
			}
			st, err := os.Stat(out)
			if err != nil {
				return nil, err
			}
			if r == 0 && who == sideImgfs {
				if err := b.verify(src, out, checkable[ext]); err != nil {
					return nil, fmt.Errorf("imgfs's output is wrong: %w", err)
				}
				s.notes = append(s.notes, "imgfs's output of run 1 compares identical to the source"+
					map[bool]string{true: " and checks clean", false: ""}[checkable[ext]])
			}
			return sample{"time": res.wall.Seconds(), "cpu": res.cpu.Seconds(),
				"rss": float64(res.maxRSS), "size": float64(st.Size())}, nil
		}}
	}
	s.sides = []side{one(sideImgfs, b.t.imgfs), one(sideQemuImg, b.t.qemuImg)}
	s.rows = []row{
		{metric: "time", peer: sideQemuImg, unit: seconds, target: timeTarget},
		{label: "CPU time", metric: "cpu", peer: sideQemuImg, unit: seconds, target: noTarget, detail: true},
		{label: "peak RSS", metric: "rss", peer: sideQemuImg, unit: byteCount, target: rssTarget, detail: true},
		{label: "output size", metric: "size", peer: sideQemuImg, unit: byteCount, target: sizeTarget, detail: true},
	}
	return s
}

// verify checks a convert's output with qemu-img.
func (b *bench) verify(src, out string, check bool) error {
	if err := run(b.ctx, b.t.qemuImg, "compare", "-q", src, out); err != nil {
		return err
	}
	if check {
		return run(b.ctx, b.t.qemuImg, "check", "-q", out)
	}
	return nil
}

// withServer exports image through side's FUSE server for fn and stops
// the server after, recording its peak RSS and CPU time in fn's sample.
func (b *bench) withServer(side, image string, writable bool, fn func(srv *server) (sample, error)) (sample, error) {
	srv, err := serve(b.ctx, b.t, side, image, b.scratch, writable)
	if err != nil {
		return nil, err
	}
	smp, err := fn(srv)
	if err == nil {
		smp["rss"], smp["cpu"] = srv.peakRSS(), srv.cpuTime()
	}
	return smp, errors.Join(err, srv.stop())
}

func fuseSides(run func(side string, r int) (sample, error)) []side {
	var sides []side
	for _, name := range []string{sideImgfs, sideQSD} {
		sides = append(sides, side{name, func(r int) (sample, error) { return run(name, r) }})
	}
	return sides
}

var (
	serverRSSRow = row{label: "server peak RSS", metric: "rss", peer: sideQSD, unit: byteCount, target: noTarget, detail: true}
	serverCPURow = row{label: "server CPU time", metric: "cpu", peer: sideQSD, unit: seconds, target: noTarget, detail: true}
)

// seqRead reads the qcow2's disk from start to end with 1 MiB reads,
// from a cold page cache and a fresh server, then once more.
func (b *bench) seqRead() *scenario {
	return &scenario{
		name: "fuse/seqread",
		sides: fuseSides(func(side string, _ int) (sample, error) {
			return b.withServer(side, b.w.qcow2, false, func(srv *server) (sample, error) {
				if err := dropCaches(); err != nil {
					return nil, err
				}
				cold, err := readAll(srv.disk, b.w.size)
				if err != nil {
					return nil, err
				}
				warm, err := readAll(srv.disk, b.w.size)
				return sample{"cold": cold, "warm": warm}, err
			})
		}),
		rows: []row{
			{label: "cold", metric: "cold", peer: sideQSD, unit: mbPerSec, target: atLeast(2)},
			{label: "re-read", metric: "warm", peer: sideQSD, unit: mbPerSec, target: atLeast(3)},
			serverRSSRow, serverCPURow,
		},
	}
}

// readAll reads path with 1 MiB reads and returns the throughput in
// MB/s; it must find size bytes.
func readAll(path string, size int64) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	start := time.Now()
	for {
		m, err := f.Read(buf)
		n += int64(m)
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, err
		}
	}
	elapsed := time.Since(start)
	if n != size {
		return 0, fmt.Errorf("%s: read %d bytes, want %d", path, n, size)
	}
	return float64(n) / 1e6 / elapsed.Seconds(), nil
}

// randRead runs fio's 4 KiB random reads (psync, buffered as an
// application's are; fio advises the kernel that access is random, so
// there is no readahead) with 1 and 4 jobs, each on a fresh server from
// a cold page cache, as the issue asks, and then, beyond the issue, with
// the image file read into the host's page cache first: cold, both sides
// mostly wait for the host disk, cached shows the cost of the FUSE
// server itself.
func (b *bench) randRead() *scenario {
	jobs := []int{1, 4}
	caches := []string{"cold", "image cached"}
	metric := func(n int, cache string) string { return fmt.Sprintf("%d job(s) %s", n, cache) }
	s := &scenario{name: "fuse/randread"}
	s.sides = fuseSides(func(side string, _ int) (sample, error) {
		smp := sample{}
		for _, cache := range caches {
			for _, n := range jobs {
				one, err := b.withServer(side, b.w.qcow2, false, func(srv *server) (sample, error) {
					if err := dropCaches(); err != nil {
						return nil, err
					}
					if cache != "cold" {
						if err := readFile(b.w.qcow2); err != nil {
							return nil, err
						}
					}
					iops, err := b.fio(srv.disk, n)
					return sample{"iops": iops}, err
				})
				if err != nil {
					return nil, err
				}
				smp[metric(n, cache)] = one["iops"]
				smp["rss"] = max(smp["rss"], one["rss"])
			}
		}
		return smp, nil
	})
	for _, cache := range caches {
		t := atLeast(1.5)
		if cache != "cold" {
			t = noTarget
		}
		for _, n := range jobs {
			s.rows = append(s.rows, row{label: metric(n, cache) + " IOPS", metric: metric(n, cache),
				peer: sideQSD, unit: perSec, target: t})
		}
	}
	s.rows = append(s.rows, serverRSSRow)
	return s
}

// readFile reads path into the page cache.
func readFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(io.Discard, f)
	return err
}

// fio returns the read IOPS of jobs readers of path.
func (b *bench) fio(path string, jobs int) (float64, error) {
	out := filepath.Join(b.scratch, "fio.json")
	defer os.Remove(out)
	_, err := measure(exec.CommandContext(b.ctx, "fio", "--name=randread", "--filename="+path, "--readonly",
		"--rw=randread", "--bs=4k", "--ioengine=psync", fmt.Sprintf("--numjobs=%d", jobs),
		"--time_based", fmt.Sprintf("--runtime=%dms", b.fioRuntime.Milliseconds()),
		"--group_reporting", "--output-format=json", "--output="+out))
	if err != nil {
		return 0, err
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return 0, err
	}
	var report struct {
		Jobs []struct {
			Read struct {
				IOPS float64 `json:"iops"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(data, &report); err != nil {
		return 0, fmt.Errorf("fio's report: %w", err)
	}
	if len(report.Jobs) != 1 {
		return 0, fmt.Errorf("fio's report has %d job groups, want 1", len(report.Jobs))
	}
	return report.Jobs[0].Read.IOPS, nil
}

// tar archives the guest filesystem, loop-mounted read-only from the
// qcow2 through imgfs, from the raw file directly, and from the qcow2
// through QSD, each from a cold page cache. The archive is piped here,
// not written to /dev/null, where GNU tar would skip reading the data.
// Every side must produce the same number of bytes.
func (b *bench) tar() *scenario {
	var want int64
	one := func(file string) (sample, error) {
		g, err := mountGuest(b.ctx, file, filepath.Join(b.scratch, "guest"), false)
		if err != nil {
			return nil, err
		}
		smp, err := func() (sample, error) {
			if err := dropCaches(); err != nil {
				return nil, err
			}
			cmd := exec.CommandContext(b.ctx, "tar", "-C", g.dir, "-cf", "-", ".")
			pipe, err := cmd.StdoutPipe()
			if err != nil {
				return nil, err
			}
			start := time.Now()
			if err := cmd.Start(); err != nil {
				return nil, err
			}
			n, copyErr := io.Copy(io.Discard, pipe)
			if err := errors.Join(copyErr, cmd.Wait()); err != nil {
				return nil, fmt.Errorf("tar: %w", err)
			}
			elapsed := time.Since(start)
			if want == 0 {
				want = n
			} else if n != want {
				return nil, fmt.Errorf("tar made %d bytes, another side %d", n, want)
			}
			return sample{"time": elapsed.Seconds()}, nil
		}()
		return smp, errors.Join(err, g.close())
	}
	s := &scenario{name: "fuse/tar"}
	s.sides = fuseSides(func(side string, _ int) (sample, error) {
		return b.withServer(side, b.w.qcow2, false, func(srv *server) (sample, error) { return one(srv.disk) })
	})
	s.sides = append(s.sides, side{sideLoopRaw, func(int) (sample, error) { return one(b.w.raw) }})
	s.rows = []row{
		{metric: "time", peer: sideLoopRaw, unit: seconds, target: atMost(1.3)},
		{metric: "time", peer: sideQSD, unit: seconds, target: atMost(0.6)},
		serverRSSRow, serverCPURow,
	}
	return s
}

// write makes an ext4 filesystem on a new empty qcow2's disk through
// the server, extracts the tarball into it and syncs; the image must
// check clean once the server has stopped.
func (b *bench) write() *scenario {
	image := filepath.Join(b.scratch, "write.qcow2")
	s := &scenario{name: "fuse/write"}
	s.sides = fuseSides(func(side string, r int) (sample, error) {
		os.Remove(image)
		defer os.Remove(image)
		if err := run(b.ctx, b.t.qemuImg, "create", "-q", "-f", "qcow2", image, fmt.Sprint(b.w.size)); err != nil {
			return nil, err
		}
		smp, err := b.withServer(side, image, true, func(srv *server) (sample, error) {
			dev, err := attachLoop(b.ctx, srv.disk, true)
			if err != nil {
				return nil, err
			}
			g := &guest{dev: dev, dir: filepath.Join(b.scratch, "guest")}
			elapsed, err := func() (time.Duration, error) {
				if err := dropCaches(); err != nil {
					return 0, err
				}
				start := time.Now()
				if err := run(b.ctx, "mkfs.ext4", "-q", "-F", dev); err != nil {
					return 0, err
				}
				if err := g.mount(b.ctx, true); err != nil {
					return 0, err
				}
				if err := run(b.ctx, "tar", "-xf", b.w.tarball, "-C", g.dir); err != nil {
					return 0, err
				}
				if err := run(b.ctx, "sync"); err != nil {
					return 0, err
				}
				return time.Since(start), nil
			}()
			return sample{"time": elapsed.Seconds()}, errors.Join(err, g.close())
		})
		if err != nil {
			return nil, err
		}
		if err := run(b.ctx, b.t.qemuImg, "check", "-q", image); err != nil {
			return nil, fmt.Errorf("after %s wrote it: %w", side, err)
		}
		if r == 0 {
			s.notes = append(s.notes, side+"'s image checks clean after run 1")
		}
		return smp, nil
	})
	s.rows = []row{
		{metric: "time", peer: sideQSD, unit: seconds, target: atMost(0.8)},
		serverRSSRow, serverCPURow,
	}
	return s
}

// sparseOps are the commands whose cost must follow the data, not the
// virtual size.
var sparseOps = []string{"info", "map", "check", "compare", "convert"}

// sparse times info, map, check, compare (with a second image of the
// same content) and convert to qcow2 of a 16 TiB image, each from a cold
// page cache and then again at once, warm.
func (b *bench) sparse(name, image, other string) *scenario {
	out := filepath.Join(b.scratch, "sparse-out.qcow2")
	args := map[string][]string{
		"info":    {"info", image},
		"map":     {"map", image},
		"check":   {"check", image},
		"compare": {"compare", image, other},
		"convert": {"convert", "-O", "qcow2", image, out},
	}
	one := func(who, bin string) side {
		return side{who, func(int) (sample, error) {
			smp := sample{}
			for _, op := range sparseOps {
				for _, cache := range []string{"cold", "warm"} {
					os.Remove(out)
					if cache == "cold" {
						if err := dropCaches(); err != nil {
							return nil, err
						}
					}
					res, err := measure(exec.CommandContext(b.ctx, bin, args[op]...))
					os.Remove(out)
					if err != nil {
						return nil, err
					}
					smp[op+" "+cache] = res.wall.Seconds()
				}
			}
			return smp, nil
		}}
	}
	s := &scenario{name: name, sides: []side{one(sideImgfs, b.t.imgfs), one(sideQemuImg, b.t.qemuImg)}}
	for _, op := range sparseOps {
		for _, cache := range []string{"cold", "warm"} {
			s.rows = append(s.rows, row{label: op + " " + cache, metric: op + " " + cache, peer: sideQemuImg,
				unit: seconds, target: under(500 * time.Millisecond)})
		}
	}
	return s
}
