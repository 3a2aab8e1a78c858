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
		Name:  "measure",
		Usage: "tell how large a new image would be",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), forceShareFlag(), formatFlag("f", false), outputFlag(), optionsFlag(),
			&cli.StringFlag{Name: "O", Usage: "output format"},
			&cli.StringFlag{Name: "l", Usage: "snapshot to measure"},
			&cli.StringFlag{Name: "size", Usage: "virtual size of a new image"},
		},
		Action: runMeasure,
	})
}

func runMeasure(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	options, err := joinOptions(c)
	if err != nil {
		return err
	}
	snap, err := snapshotParam(c)
	if err != nil {
		return err
	}
	asJSON, err := wantJSON(c)
	if err != nil {
		return err
	}
	size := int64(-1)
	if c.IsSet("size") {
		if size, err = sizeArg("image size", c.String("size")); err != nil {
			return err
		}
	}
	args := c.Args().Slice()
	switch {
	case len(args) > 1:
		return errors.New("At most one filename argument is allowed.")
	case len(args) == 0 && (c.Bool("image-opts") || c.IsSet("f") || c.IsSet("l")):
		return errors.New("--image-opts, -f, and -l require a filename argument.")
	case len(args) == 1 && size >= 0:
		return errors.New("--size N cannot be used together with a filename.")
	case len(args) == 0 && size < 0:
		return errors.New("Either --size N or one filename must be specified.")
	}
	var src formats.Image
	if len(args) == 1 {
		if src, err = op.open(args[0], c.String("f"), true, false); err != nil {
			return err
		}
		defer src.Close()
		if snap != nil {
			if src, err = control.OpenSnapshot(src, *snap); err != nil {
				return err
			}
			defer src.Close()
		}
	}
	rep, err := control.Measure(control.MeasureOptions{
		Format:  c.String("O"),
		Options: options,
		Secrets: op.secrets,
		Size:    size,
		Source:  src,
	})
	var oe *control.OptionsError
	if errors.As(err, &oe) {
		// Two messages, each with the program name.
		return fmt.Errorf("%v\n%s: Invalid options for file format '%s'", oe.Err, prog, oe.Format)
	}
	if err != nil {
		return err
	}
	if asJSON {
		fmt.Fprint(c.App.Writer, rep.JSON())
	} else {
		fmt.Fprint(c.App.Writer, rep.Human())
	}
	return nil
}

// snapshotParam reads -l as qemu-img's convert and measure do: a value
// starting "snapshot." is parsed as snapshot.id=...,snapshot.name=...
// while the options are read; anything else is an ID or a name. It
// returns nil without -l.
func snapshotParam(c *cli.Context) (*control.SnapshotParam, error) {
	param := c.String("l")
	if !c.IsSet("l") {
		return nil, nil
	}
	if !strings.HasPrefix(param, "snapshot.") {
		return &control.SnapshotParam{IDOrName: param}, nil
	}
	kvs, err := parseKeyValues(param, "")
	if err == nil {
		for _, kv := range kvs {
			if kv.key != "snapshot.id" && kv.key != "snapshot.name" {
				err = fmt.Errorf("Invalid parameter '%s'", kv.key)
				break
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%v\n%s: Failed in parsing snapshot param '%s'", err, prog, param)
	}
	return &control.SnapshotParam{ID: kvs.get("snapshot.id"), Name: kvs.get("snapshot.name")}, nil
}
