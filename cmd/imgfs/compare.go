package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "compare",
		Usage: "check whether two images have the same content",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), formatFlag("f", false), formatFlag("F", false),
			cacheFlag("T"),
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			quietFlag(),
			&cli.BoolFlag{Name: "s", Usage: "strict mode: fail on different size or allocation"},
			forceShareFlag(),
		},
		Action: runCompare,
	})
}

// runCompare exits as img_compare: 0 identical, 1 different, 2 an image
// could not be opened, 3 block status failed, 4 a read failed.
func runCompare(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return withCode(2, err)
	}
	args, err := operands(c, 2, "Expecting two image file names")
	if err != nil {
		return err
	}
	quiet := c.Bool("q")
	// qemu-img starts the progress line before opening the images, so
	// its final newline comes even when they cannot be opened.
	bar := newProgressBar(c, c.Bool("p") && !quiet, 2)
	defer bar.end()
	if err := op.setCache(c, "T", "Invalid source cache option"); err != nil {
		return withCode(2, err)
	}
	img1, err := op.open(args[0], c.String("f"), true, false)
	if err != nil {
		return withCode(2, err)
	}
	defer img1.Close()
	img2, err := op.open(args[1], c.String("F"), true, false)
	if err != nil {
		return withCode(2, err)
	}
	defer img2.Close()
	opts := control.CompareOptions{
		Image1: img1, Image2: img2, Name1: args[0], Name2: args[1],
		Strict: c.Bool("s"), Progress: bar.chunks(),
	}
	if !quiet {
		opts.Print = func(line string) { fmt.Fprint(c.App.Writer, line) }
	}
	res, err := control.Compare(c.Context, opts)
	switch {
	case errors.Is(err, control.ErrAllocationTest):
		return withCode(3, err)
	case err != nil:
		return withCode(4, err)
	}
	if !res.Identical {
		return withCode(1, nil)
	}
	return nil
}
