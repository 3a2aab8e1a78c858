package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "rebase",
		Usage: "change an image's backing file",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), forceShareFlag(), quietFlag(), formatFlag("f", false),
			cacheFlag("t"), cacheFlag("T"),
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "u", Usage: "unsafe: only rewrite the backing reference"},
			&cli.BoolFlag{Name: "c", Usage: "compress the merged clusters"},
			&cli.StringFlag{Name: "b", Usage: "new backing file"},
			&cli.StringFlag{Name: "F", Usage: "new backing file format"},
		},
		Action: runRebase,
	})
}

// runRebase follows img_rebase. Its progress starts before the image is
// opened and reaches 100% even when rewriting the reference fails.
func runRebase(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	unsafe := c.Bool("u")
	if !unsafe && !c.IsSet("b") {
		return usageError{"Must specify backing file (-b) or use unsafe mode (-u)"}
	}
	quiet := c.Bool("q")
	bar := newProgressBar(c, c.Bool("p") && !quiet, 2)
	defer bar.end()
	bar.print(0, 100)
	if err := op.setCache(c, "t", "Invalid cache option"); err != nil {
		return err
	}
	srcDirect := false
	if c.IsSet("T") {
		var ok bool
		if srcDirect, ok = cacheDirect(c.String("T")); !ok {
			return fmt.Errorf("Invalid source cache option: %s", c.String("T"))
		}
	}
	// -U applies to the backing files only; the image is written.
	forceShare := op.forceShare
	op.forceShare = false
	img, err := op.open(args[0], c.String("f"), false, unsafe)
	if err != nil {
		return err
	}
	defer img.Close()
	err = control.Rebase(c.Context, control.RebaseOptions{
		Image:         img,
		Backing:       c.String("b"),
		BackingGiven:  c.IsSet("b"),
		BackingFormat: c.String("F"),
		Unsafe:        unsafe,
		Compress:      c.Bool("c"),
		OpenBacking: func(path, format string) (formats.Image, error) {
			return formats.Open(path, formats.OpenOptions{
				Format: format, ReadOnly: true, ForceShare: forceShare, Direct: srcDirect,
				Warn: func(msg string) { fmt.Fprintln(c.App.ErrWriter, msg) },
			})
		},
		// img_rebase adds 100 / pieces percent per compared range.
		Progress: func(_, pieces int64) { bar.print(float32(100)/float32(pieces), 100) },
	})
	var change *control.RebaseChangeError
	if err == nil || errors.As(err, &change) {
		bar.print(100, 0)
	}
	return err
}
