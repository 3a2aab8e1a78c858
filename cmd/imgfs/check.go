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
		Name:  "check",
		Usage: "check an image for consistency",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), quietFlag(), formatFlag("f", true), outputFlag(),
			&cli.StringFlag{Name: "r", Aliases: []string{"repair"}, Usage: "repair leaks or all"},
			cacheFlag("T"), forceShareFlag(),
		},
		Action: runCheck,
	})
}

// runCheck exits as img_check: 0 clean, 1 check failed, 2 corruption,
// 3 leaks only, 63 no check for this format.
func runCheck(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	mode := formats.CheckReadOnly
	if c.IsSet("r") {
		switch r := c.String("r"); r {
		case "leaks":
			mode = formats.CheckFixLeaks
		case "all":
			mode = formats.CheckFixAll
		default:
			return usageError{fmt.Sprintf("Unknown option value for -r (expecting 'leaks' or 'all'): %s", r)}
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
	if err := op.setCache(c, "T", "Invalid source cache option"); err != nil {
		return err
	}
	op.check = true
	img, err := op.open(args[0], c.String("f"), mode == formats.CheckReadOnly, false)
	if err != nil {
		return err
	}
	defer img.Close()
	stderr := c.App.ErrWriter
	rep, err := control.Check(c.Context, control.CheckOptions{
		Image:    img,
		Filename: args[0],
		Mode:     mode,
		Report: func(msg string) {
			fmt.Fprint(stderr, msg)
			if !strings.HasSuffix(msg, "\n") {
				fmt.Fprintln(stderr)
			}
		},
	})
	if errors.Is(err, control.ErrCheckUnsupported) {
		return withCode(63, err)
	}
	if err != nil {
		if rep != nil && !asJSON && !c.Bool("q") {
			fmt.Fprint(c.App.Writer, rep.RepairSummary())
		}
		return fmt.Errorf("Check failed: %w", err)
	}
	if !c.Bool("q") {
		if asJSON {
			fmt.Fprint(c.App.Writer, rep.JSON())
		} else {
			fmt.Fprint(c.App.Writer, rep.Human())
		}
	}
	code := rep.ExitCode()
	if rep.CheckErrors != 0 {
		return withCode(code, errors.New("Check failed"))
	}
	if code != 0 {
		return withCode(code, nil)
	}
	return nil
}
