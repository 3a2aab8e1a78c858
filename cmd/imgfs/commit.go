package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "commit",
		Usage: "commit an image's changes into its backing file",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), quietFlag(), formatFlag("f", false), cacheFlag("t"),
			&cli.StringFlag{Name: "b", Usage: "backing file to commit into"},
			&cli.StringFlag{Name: "r", Usage: "rate limit"},
			&cli.BoolFlag{Name: "d", Usage: "leave the image's data in place"},
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
		},
		Action: runCommit,
	})
}

// runCommit follows img_commit: options, the image (opened read-write
// with its chain), progress, then the commit and "Image committed.".
func runCommit(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	var rate int64
	if c.IsSet("r") {
		if rate, err = sizeArg("rate limit", c.String("r")); err != nil {
			return err
		}
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	// BDRV_DEFAULT_CACHE
	mode := "writeback"
	if c.IsSet("t") {
		mode = c.String("t")
	}
	cache, ok := control.ParseCacheMode(mode)
	if !ok {
		return fmt.Errorf("Invalid cache option: %s", mode)
	}
	op.direct = cache.Direct
	filename, format := args[0], c.String("f")
	top, err := op.open(filename, format, false, false)
	if err != nil {
		return err
	}
	quiet := c.Bool("q")
	bar := newProgressBar(c, c.Bool("p") && !quiet, 1)
	bar.print(0, 100)
	err = control.Commit(c.Context, control.CommitOptions{
		Top:      top,
		Filename: filename,
		ReopenTop: func() (formats.Image, error) {
			return op.open(filename, format, false, true)
		},
		Base:      c.String("b"),
		Drop:      c.Bool("d") || c.IsSet("b"),
		RateLimit: rate,
		Cache:     cache,
		Progress:  bar.fraction(),
	})
	if err == nil {
		bar.print(100, 0)
	}
	// The progress line ends before the result is reported.
	bar.end()
	if err != nil {
		return err
	}
	if !quiet {
		fmt.Fprintln(c.App.Writer, "Image committed.")
	}
	return nil
}
