package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "info",
		Usage: "show information about an image",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), formatFlag("f", true), outputFlag(),
			&cli.BoolFlag{Name: "backing-chain", Usage: "describe every image of the backing chain"},
			forceShareFlag(),
		},
		Action: runInfo,
	})
}

func runInfo(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	asJSON, err := wantJSON(c)
	if err != nil {
		return err
	}
	name := op.imageName(args[0], c.String("f"))
	first := true
	list, err := control.Info(control.InfoOptions{
		Filename:     args[0],
		Format:       c.String("f"),
		BackingChain: c.Bool("backing-chain"),
		Name:         name,
		Open: func(name, format string) (formats.Image, error) {
			// Like qemu-img (BDRV_O_NO_BACKING | BDRV_O_NO_IO), info
			// reads headers only. --image-opts describes the top image;
			// the backing files of the chain are plain names.
			o := *op
			o.imageOpts = op.imageOpts && first
			o.noIO = true
			first = false
			return o.open(name, format, true, true)
		},
	})
	if err != nil {
		return err
	}
	if asJSON {
		fmt.Fprint(c.App.Writer, list.JSON())
	} else {
		fmt.Fprint(c.App.Writer, list.Human())
	}
	return nil
}
