package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "resize",
		Usage: "change the virtual size of an image",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), formatFlag("f", false), quietFlag(),
			&cli.StringFlag{Name: "preallocation", Usage: "preallocation mode for the new part"},
			&cli.BoolFlag{Name: "shrink", Usage: "allow making the image smaller"},
		},
		Action: runResize,
	})
	// The size comes off the command line before the options, so that
	// "-1G" is a size.
	lastOperand["resize"] = true
}

func runResize(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	prealloc := c.String("preallocation")
	if c.IsSet("preallocation") && !control.ValidPrealloc(prealloc) {
		return fmt.Errorf("Invalid preallocation mode '%s'", prealloc)
	}
	// main took the size off the end; it follows the other operands.
	args := c.Args().Slice()
	if len(args) != 2 {
		return usageError{"Expecting image file name and size"}
	}
	filename := args[0]
	size, err := control.ParseResizeSize(args[1])
	if err != nil {
		return err
	}
	img, err := op.open(filename, c.String("f"), false, false)
	if err != nil {
		return err
	}
	defer img.Close()
	err = control.Resize(control.ResizeOptions{Image: img, Size: size, Prealloc: prealloc, Shrink: c.Bool("shrink")})
	if errors.Is(err, control.ErrShrinkRefused) {
		fmt.Fprintf(c.App.ErrWriter, "%s: %v\n%s: warning: %s\n", prog, err, prog, control.ShrinkWarning)
		return withCode(1, nil)
	}
	if err != nil {
		return err
	}
	if !c.Bool("q") {
		fmt.Fprintln(c.App.Writer, "Image resized.")
	}
	return nil
}
