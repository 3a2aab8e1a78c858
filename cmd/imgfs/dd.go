package main

import (
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "dd",
		Usage: "copy part of an image into a new one",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), forceShareFlag(), formatFlag("f", false),
			&cli.StringFlag{Name: "O", Usage: "output format"},
		},
		Action: runDD,
	})
}

// ddOperands are dd's key=value operands.
type ddOperands struct {
	in, out           string
	hasIn, hasOut     bool
	bs                int64
	count, skip       int64
	hasCount, hasSkip bool
}

// parseDDOperands reads the operands in order, as img_dd does: the
// first bad one stops with its message.
func parseDDOperands(args []string) (*ddOperands, error) {
	o := &ddOperands{bs: control.DefaultDDBlockSize}
	for _, arg := range args {
		key, value, ok := strings.Cut(arg, "=")
		if !ok {
			return nil, fmt.Errorf("unrecognized operand %s", arg)
		}
		var err error
		switch key {
		case "bs":
			o.bs, err = sizeArgIn("bs", value, 1, math.MaxInt32)
		case "count":
			o.count, err = sizeArg("count", value)
			o.hasCount = true
		case "skip":
			o.skip, err = sizeArg("skip", value)
			o.hasSkip = true
		case "if":
			o.in, o.hasIn = value, true
		case "of":
			o.out, o.hasOut = value, true
		default:
			return nil, fmt.Errorf("unrecognized operand %s", key)
		}
		if err != nil {
			return nil, err
		}
	}
	if !o.hasIn || !o.hasOut {
		return nil, errors.New("Must specify both input and output files")
	}
	return o, nil
}

func runDD(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	o, err := parseDDOperands(c.Args().Slice())
	if err != nil {
		return err
	}
	src, err := op.open(o.in, c.String("f"), true, false)
	if err != nil {
		return err
	}
	defer src.Close()
	outFmt := c.String("O")
	if !c.IsSet("O") {
		outFmt = "raw"
	}
	return control.DD(c.Context, control.DDOptions{
		Source:       src,
		SourceName:   o.in,
		Target:       o.out,
		TargetFormat: outFmt,
		BlockSize:    o.bs,
		Count:        o.count,
		HasCount:     o.hasCount,
		Skip:         o.skip,
		HasSkip:      o.hasSkip,
		OpenTarget: func() (formats.Image, error) {
			// The target is a plain file name, opened without -U.
			top := *op
			top.imageOpts, top.forceShare = false, false
			return top.open(o.out, outFmt, false, false)
		},
		Warn: func(msg string) { fmt.Fprintf(c.App.ErrWriter, "%s: %s\n", prog, msg) },
	})
}
