package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

func init() {
	stringFlag := func(name, usage string) cli.Flag { return &cli.StringFlag{Name: name, Usage: usage} }
	boolFlag := func(name, usage string) cli.Flag { return &cli.BoolFlag{Name: name, Usage: usage} }
	commands = append(commands, &cli.Command{
		Name:  "bench",
		Usage: "run a simple I/O benchmark on an image",
		Flags: []cli.Flag{
			imageOptsFlag(), forceShareFlag(), quietFlag(), formatFlag("f", false), cacheFlag("t"),
			stringFlag("c", "number of requests"),
			stringFlag("d", "requests in parallel"),
			stringFlag("o", "offset of the first request"),
			stringFlag("s", "bytes per request"),
			stringFlag("S", "distance between request offsets"),
			stringFlag("i", "AIO backend (threads, native, io_uring)"),
			stringFlag("pattern", "byte written by write requests"),
			stringFlag("flush-interval", "requests between flushes"),
			boolFlag("no-drain", "flush without waiting for requests in flight"),
			boolFlag("n", "native AIO"),
			boolFlag("w", "write instead of read"),
		},
		Action: runBench,
	})
}

// strtoulArg reads an option value as qemu_strtoul with base 0 does
// (leading blanks, a sign, 0x hex or 0 octal, nothing after the
// digits) and checks it against max. A minus wraps around, as in C, so
// it never passes the check.
func strtoulArg(s string, max uint64) (uint64, bool) {
	p := strings.TrimLeft(s, " \t\n\v\f\r")
	neg := strings.HasPrefix(p, "-")
	if neg || strings.HasPrefix(p, "+") {
		p = p[1:]
	}
	base := 10
	switch {
	case len(p) > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X'):
		base, p = 16, p[2:]
	case len(p) > 1 && p[0] == '0':
		base, p = 8, p[1:]
	}
	// With an explicit base strconv takes neither prefixes nor
	// underscores, as strtoul.
	n, err := strconv.ParseUint(p, base, 64)
	if err != nil {
		return 0, false
	}
	if neg && n != 0 {
		return 0, false
	}
	return n, n <= max
}

func runBench(c *cli.Context) error {
	o := control.BenchOptions{
		Count:   control.DefaultBenchCount,
		Depth:   control.DefaultBenchDepth,
		BufSize: control.DefaultBenchBufSize,
		Write:   c.Bool("w"),
		Drain:   !c.Bool("no-drain"),
	}
	// The int options, with img_bench's messages.
	for _, f := range []struct {
		name, msg string
		max       uint64
		set       func(uint64)
	}{
		{"c", "Invalid request count specified", math.MaxInt32, func(n uint64) { o.Count = int(n) }},
		{"d", "Invalid queue depth specified", math.MaxInt32, func(n uint64) { o.Depth = int(n) }},
		{"pattern", "Invalid pattern byte specified", 0xff, func(n uint64) { o.Pattern = byte(n) }},
		{"flush-interval", "Invalid flush interval specified", math.MaxInt32, func(n uint64) { o.FlushInterval = int(n) }},
	} {
		if !c.IsSet(f.name) {
			continue
		}
		n, ok := strtoulArg(c.String(f.name), f.max)
		if !ok {
			return errors.New(f.msg)
		}
		f.set(n)
	}
	var err error
	if c.IsSet("o") {
		if o.Offset, err = sizeArg("offset", c.String("o")); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name, what string
		dst        *int
	}{{"s", "buffer size", &o.BufSize}, {"S", "step_size", &o.Step}} {
		if c.IsSet(f.name) {
			n, err := sizeArgIn(f.what, c.String(f.name), 0, math.MaxInt32)
			if err != nil {
				return err
			}
			*f.dst = int(n)
		}
	}
	var cache control.CacheMode
	if c.IsSet("t") {
		var ok bool
		if cache, ok = control.ParseCacheMode(c.String("t")); !ok {
			return errors.New("Invalid cache mode")
		}
	}
	o.WriteThrough = cache.WriteThrough
	native := c.Bool("n")
	if c.IsSet("i") {
		switch aio := c.String("i"); aio {
		case "native":
			native = true
		case "threads", "io_uring":
		default:
			return fmt.Errorf("Invalid aio option: %s", aio)
		}
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	switch {
	case !o.Write && o.FlushInterval != 0:
		return errors.New("--flush-interval is only available in write tests")
	case o.FlushInterval != 0 && o.FlushInterval < o.Depth:
		return errors.New("Flush interval can't be smaller than depth")
	}
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	op.direct = cache.Direct
	img, err := op.open(args[0], c.String("f"), !o.Write, false)
	if err != nil {
		return err
	}
	defer img.Close()
	if native && !cache.Direct {
		// Linux AIO needs O_DIRECT; QEMU refuses it while opening.
		return fmt.Errorf("Could not open '%s': aio=native was specified, but it requires cache.direct=on, which was not specified.", args[0])
	}
	o.Image = img
	// qemu-img prints these even with -q.
	fmt.Fprint(c.App.Writer, o.Header())
	elapsed, err := control.Bench(c.Context, o)
	if err != nil {
		return err
	}
	fmt.Fprint(c.App.Writer, control.BenchSummary(elapsed))
	return nil
}
