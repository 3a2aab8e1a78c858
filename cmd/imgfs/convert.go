package main

import (
	"errors"
	"fmt"
	"runtime/debug"
	"strconv"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	boolFlag := func(name, usage string) cli.Flag { return &cli.BoolFlag{Name: name, Usage: usage} }
	stringFlag := func(name, usage string) cli.Flag { return &cli.StringFlag{Name: name, Usage: usage} }
	commands = append(commands, &cli.Command{
		Name:  "convert",
		Usage: "convert images to another format or layout",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), forceShareFlag(), quietFlag(), optionsFlag(),
			formatFlag("f", false), cacheFlag("t"), cacheFlag("T"),
			boolFlag("target-image-opts", "treat the target name as an option string"),
			boolFlag("target-is-zero", "the existing target reads as zeroes"),
			boolFlag("bitmaps", "copy persistent bitmaps"),
			boolFlag("skip-broken-bitmaps", "skip inconsistent bitmaps"),
			boolFlag("salvage", "turn read errors into zeroes"),
			boolFlag("C", "copy offloading"),
			boolFlag("c", "compress the target"),
			boolFlag("p", "show progress"),
			boolFlag("n", "do not create the target"),
			boolFlag("W", "write out of order"),
			stringFlag("O", "target format"),
			stringFlag("B", "target backing file"),
			stringFlag("F", "target backing format"),
			stringFlag("l", "snapshot to convert"),
			stringFlag("S", "sparse size"),
			stringFlag("r", "rate limit"),
			stringFlag("m", "requests in flight"),
		},
		Action: runConvert,
	})
}

// convertFlags are convert's options after the checks img_convert makes
// while it reads them.
type convertFlags struct {
	options         string
	sparse          int64
	explicitSparse  bool
	workers         int
	rate            int64
	outFmt          string
	skipCreate      bool
	tgtImageOpts    bool
	compressed      bool
	copyWhole       bool
	salvage         bool
	targetIsZero    bool
	bitmaps         bool
	skipBrokenBmaps bool
	// snapshot is -l, nil without it.
	snapshot *control.SnapshotParam
}

func readConvertFlags(c *cli.Context) (*convertFlags, error) {
	f := &convertFlags{
		sparse:          control.DefaultSparseSize,
		workers:         control.DefaultWorkers,
		outFmt:          c.String("O"),
		skipCreate:      c.Bool("n"),
		tgtImageOpts:    c.Bool("target-image-opts"),
		compressed:      c.Bool("c"),
		copyWhole:       c.Bool("C"),
		salvage:         c.Bool("salvage"),
		targetIsZero:    c.Bool("target-is-zero"),
		bitmaps:         c.Bool("bitmaps"),
		skipBrokenBmaps: c.Bool("skip-broken-bitmaps"),
	}
	var err error
	if f.options, err = joinOptions(c); err != nil {
		return nil, err
	}
	if f.snapshot, err = snapshotParam(c); err != nil {
		return nil, err
	}
	if c.IsSet("S") {
		if f.sparse, err = sizeArg("buffer size for sparse output", c.String("S")); err != nil {
			return nil, err
		}
		if f.sparse%512 != 0 || f.sparse > control.MaxSparseSize {
			return nil, fmt.Errorf("Invalid buffer size for sparse output specified. "+
				"Valid sizes are multiples of %d up to %d. Select 0 to disable sparse detection "+
				"(fully allocates output).", 512, control.MaxSparseSize)
		}
		f.explicitSparse = true
	}
	if c.IsSet("m") {
		n, err := strconv.ParseInt(c.String("m"), 0, 64)
		if err != nil || n < 1 || n > control.MaxWorkers {
			return nil, fmt.Errorf("Invalid number of coroutines. Allowed number of coroutines is between 1 and %d",
				control.MaxWorkers)
		}
		f.workers = int(n)
	}
	if c.IsSet("r") {
		if f.rate, err = sizeArg("rate limit", c.String("r")); err != nil {
			return nil, err
		}
	}
	if !c.IsSet("O") && !f.tgtImageOpts {
		f.outFmt = "raw"
	}
	switch {
	case f.skipBrokenBmaps && !f.bitmaps:
		return nil, errors.New("Use of --skip-broken-bitmaps requires --bitmaps")
	case f.compressed && f.copyWhole:
		return nil, errors.New("Cannot enable copy offloading when -c is used")
	case f.explicitSparse && f.copyWhole:
		return nil, errors.New("Cannot enable copy offloading when -S is used")
	case f.copyWhole && f.salvage:
		return nil, errors.New("Cannot use copy offloading in salvaging mode")
	case f.tgtImageOpts && !f.skipCreate:
		return nil, errors.New("--target-image-opts requires use of -n flag")
	case f.skipCreate && f.options != "":
		return nil, errors.New("-o has no effect when skipping image creation")
	case f.targetIsZero && !f.skipCreate:
		return nil, errors.New("--target-is-zero requires use of -n flag")
	}
	return f, nil
}

func runConvert(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	f, err := readConvertFlags(c)
	if err != nil {
		return err
	}
	args := c.Args().Slice()
	var target string
	if len(args) >= 2 {
		target = args[len(args)-1]
	}
	if formats.HasHelpOption(f.options) {
		if f.outFmt == "" {
			return errors.New("Option help requires a format be specified")
		}
		text, err := control.OptionHelp(f.outFmt, target != "")
		if err != nil {
			return err
		}
		fmt.Fprint(c.App.Writer, text)
		return nil
	}
	if len(args) < 2 {
		return errors.New("Must specify image file name")
	}
	if err := op.setCache(c, "T", "Invalid source cache option"); err != nil {
		return err
	}
	quiet := c.Bool("q")
	bar := newProgressBar(c, c.Bool("p") && !quiet, 1)
	defer bar.end()
	bar.print(0, 100)

	var sources []formats.Image
	defer func() {
		for _, img := range sources {
			img.Close()
		}
	}()
	for _, name := range args[:len(args)-1] {
		img, err := op.open(name, c.String("f"), true, false)
		if err != nil {
			return err
		}
		sources = append(sources, img)
	}
	inputs := sources
	if f.snapshot != nil {
		if len(sources) > 1 {
			return errors.New("No support for concatenating multiple snapshot")
		}
		view, err := control.OpenSnapshot(sources[0], *f.snapshot)
		if err != nil {
			return err
		}
		// The view closes before the sources (deferred calls run in
		// reverse order).
		defer view.Close()
		inputs = []formats.Image{view}
	}
	if f.bitmaps {
		if err := control.CheckCopyBitmaps(sources, f.outFmt, f.skipBrokenBmaps); err != nil {
			return err
		}
	}
	// Nearly all of convert's heap is its requests' buffers, reused
	// until the end; with the default GOGC the heap would grow to twice
	// that before the first collection. The little garbage there is
	// fits in a quarter.
	debug.SetGCPercent(25)
	err = control.Convert(c.Context, control.ConvertOptions{
		Sources:      inputs,
		Target:       target,
		TargetFormat: f.outFmt,
		Options:      f.options,
		Secrets:      op.secrets,
		SkipCreate:   f.skipCreate,
		OpenTarget: func(cache control.CacheMode) (formats.Image, error) {
			// The target is opened like the sources, but without -U.
			top := *op
			top.imageOpts, top.forceShare = f.tgtImageOpts, false
			top.direct, top.noFlush = cache.Direct, cache.NoFlush
			if kvs, err := parseKeyValues(f.options, ""); err == nil {
				// luks names the passphrase key-secret, qcow2 and qcow
				// encrypt.key-secret.
				top.keySecret = kvs.get("key-secret")
				if f.outFmt == "qcow2" || f.outFmt == "qcow" {
					top.keySecret = kvs.get("encrypt.key-secret")
				}
			}
			return top.open(target, f.outFmt, false, false)
		},
		BackingFile:   c.String("B"),
		BackingFormat: c.String("F"),
		Compressed:    f.compressed,
		SparseSize:    f.sparse,
		Workers:       f.workers,
		OutOfOrder:    c.Bool("W"),
		CopyWhole:     f.copyWhole,
		TargetIsZero:  f.targetIsZero,
		Salvage:       f.salvage,
		RateLimit:     f.rate,
		TargetCache:   c.String("t"),
		Progress:      bar.fraction(),
		Warn: func(msg string) {
			if !quiet {
				fmt.Fprintf(c.App.ErrWriter, "%s: warning: %s\n", prog, msg)
			}
		},
	})
	var zero *control.ExitZeroError
	if errors.As(err, &zero) {
		bar.print(100, 0)
		return withCode(0, zero.Err)
	}
	if err != nil {
		return err
	}
	if f.bitmaps {
		top := *op
		top.imageOpts, top.forceShare = f.tgtImageOpts, false
		out, err := top.open(target, f.outFmt, false, false)
		if err != nil {
			return err
		}
		err = control.CopyBitmaps(sources[0], out, f.skipBrokenBmaps, func(msg string) {
			fmt.Fprintf(c.App.ErrWriter, "%s: warning: %s\n", prog, msg)
		})
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	bar.print(100, 0)
	return nil
}
