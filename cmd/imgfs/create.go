package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "create",
		Usage: "create a new disk image",
		Flags: []cli.Flag{
			objectFlag(), quietFlag(), formatFlag("f", false),
			&cli.StringFlag{Name: "b", Usage: "backing file"},
			&cli.StringFlag{Name: "F", Usage: "backing file format"},
			&cli.BoolFlag{Name: "u", Usage: "do not open the backing file"},
			optionsFlag(),
		},
		Action: runCreate,
	})
}

// optionsFlag is -o; it may be given several times.
func optionsFlag() cli.Flag {
	return &cli.StringSliceFlag{Name: "o", Usage: "format options", KeepSpace: true}
}

// joinOptions checks each -o list as qemu-img's accumulate_options does
// and joins them with commas.
func joinOptions(c *cli.Context) (string, error) {
	lists := c.StringSlice("o")
	for _, l := range lists {
		if !formats.ValidOptionList(l) {
			return "", fmt.Errorf("Invalid option list: %s", l)
		}
	}
	return strings.Join(lists, ","), nil
}

func runCreate(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	options, err := joinOptions(c)
	if err != nil {
		return err
	}
	format := c.String("f")
	if !c.IsSet("f") {
		format = "raw"
	}
	args := c.Args().Slice()
	if formats.HasHelpOption(options) {
		text, err := control.OptionHelp(format, len(args) > 0)
		if err != nil {
			return err
		}
		fmt.Fprint(c.App.Writer, text)
		return nil
	}
	if len(args) == 0 {
		return usageError{"Expecting image file name"}
	}
	filename, size := args[0], int64(-1)
	if len(args) > 1 {
		if size, err = sizeArg("image size", args[1]); err != nil {
			return err
		}
	}
	if len(args) > 2 {
		return usageError{"Unexpected argument: " + args[2]}
	}
	plan, err := control.PlanCreate(control.CreateOptions{
		Filename:      filename,
		Format:        format,
		Size:          size,
		BackingFile:   c.String("b"),
		BackingGiven:  c.IsSet("b"),
		BackingFormat: c.String("F"),
		NoBackingOpen: c.Bool("u"),
		Options:       options,
		Secrets:       op.secrets,
	})
	if err != nil {
		return createError(c, filename, err)
	}
	if !c.Bool("q") {
		fmt.Fprintln(c.App.Writer, plan.String())
		flush(c.App.Writer) // bdrv_img_create's fflush: the line precedes any error
	}
	if err := plan.Run(); err != nil {
		return createError(c, filename, err)
	}
	return nil
}

// createError prefixes err with the image name, as bdrv_img_create's
// errors are. QEMU 7.2 ends the "Detected format" hint without a
// newline; that message is printed here to keep it so.
func createError(c *cli.Context, filename string, err error) error {
	var mf *control.MissingBackingFormatError
	if errors.As(err, &mf) && mf.Detected != "" {
		fmt.Fprintf(c.App.ErrWriter, "%s: %s: %v", prog, filename, err)
		return withCode(1, nil)
	}
	return fmt.Errorf("%s: %w", filename, err)
}
