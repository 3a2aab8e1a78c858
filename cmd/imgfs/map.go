package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "map",
		Usage: "dump the metadata of an image's backing chain",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), formatFlag("f", true), outputFlag(),
			&cli.StringFlag{Name: "s", Aliases: []string{"start-offset"}, Usage: "first byte to map"},
			&cli.StringFlag{Name: "l", Aliases: []string{"max-length"}, Usage: "how many bytes to map"},
			forceShareFlag(),
		},
		Action: runMap,
	})
}

func runMap(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	start, maxLen := int64(0), int64(-1)
	// qemu-img converts the numbers while it parses options, before it
	// looks at the operands.
	if c.IsSet("s") {
		if start, err = sizeArg("start offset", c.String("s")); err != nil {
			return err
		}
	}
	if c.IsSet("l") {
		if maxLen, err = sizeArg("max length", c.String("l")); err != nil {
			return err
		}
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	asJSON, err := wantJSON(c)
	if err != nil {
		return err
	}
	img, err := op.open(args[0], c.String("f"), true, false)
	if err != nil {
		return err
	}
	defer img.Close()
	res := control.Map(c.Context, control.MapOptions{Image: img, Start: start, MaxLength: maxLen, Human: !asJSON})
	var text string
	if asJSON {
		text, err = res.JSON()
	} else {
		text, err = res.Human()
	}
	fmt.Fprint(c.App.Writer, text)
	return err
}
