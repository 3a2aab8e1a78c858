package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "amend",
		Usage: "change the format options of an image",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), formatFlag("f", false), quietFlag(), optionsFlag(),
			cacheFlag("t"),
			&cli.BoolFlag{Name: "p", Usage: "show progress"},
			&cli.BoolFlag{Name: "force", Usage: "allow changes that may lose data (encryption keyslots)"},
		},
		Action: runAmend,
	})
}

// runAmend is img_amend, with its checks in its order.
func runAmend(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	options, err := joinOptions(c)
	if err != nil {
		return err
	}
	if options == "" {
		return usageError{control.ErrAmendNoOptions.Error()}
	}
	bar := newProgressBar(c, c.Bool("p") && !c.Bool("q"), 1)
	// qemu-img reports the error before the progress line's final
	// newline.
	if err := amend(c, op, bar, options); err != nil {
		code := exitCode(err, c.App.ErrWriter)
		bar.end()
		return withCode(code, nil)
	}
	bar.end()
	return nil
}

func amend(c *cli.Context, op *opener, bar *progressBar, options string) error {
	format := c.String("f")
	help := formats.HasHelpOption(options)
	if format != "" && help {
		return printAmendHelp(c, format)
	}
	if c.NArg() != 1 {
		return fmt.Errorf("Expecting one image file name")
	}
	mode := "writeback" // BDRV_DEFAULT_CACHE
	if c.IsSet("t") {
		mode = c.String("t")
	}
	cache, ok := control.ParseCacheMode(mode)
	if !ok {
		return fmt.Errorf("Invalid cache option: %s", mode)
	}
	op.direct = cache.Direct
	img, err := op.open(c.Args().First(), format, false, false)
	if err != nil {
		return err
	}
	defer img.Close()
	if help {
		return printAmendHelp(c, img.Format())
	}
	progress := func(done, total int64) {
		// amend_status_cb: 100.f * offset / total_work_size, in float.
		bar.print(100*float32(done)/float32(total), 0)
	}
	if err := control.Amend(control.AmendOptions{Image: img, Options: options, Force: c.Bool("force"), Secrets: op.secrets, Progress: progress}); err != nil {
		return err
	}
	return img.Close()
}

func printAmendHelp(c *cli.Context, format string) error {
	text, err := control.AmendHelp(format)
	if err != nil {
		return err
	}
	fmt.Fprint(c.App.Writer, text)
	return nil
}
