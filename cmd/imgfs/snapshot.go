package main

import (
	"bytes"
	"fmt"
	"io"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
	"github.com/imgfs/imgfs/formats"
)

func init() {
	commands = append(commands, &cli.Command{
		Name:  "snapshot",
		Usage: "list, apply, create or delete internal snapshots",
		Flags: []cli.Flag{
			objectFlag(), imageOptsFlag(), forceShareFlag(), quietFlag(),
			&cli.BoolFlag{Name: "l", Usage: "list snapshots"}, // c.Count sees repeats
			// Slices, so that a repeated action is seen and refused.
			&cli.StringSliceFlag{Name: "a", Usage: "apply a snapshot", KeepSpace: true},
			&cli.StringSliceFlag{Name: "c", Usage: "create a snapshot", KeepSpace: true},
			&cli.StringSliceFlag{Name: "d", Usage: "delete a snapshot", KeepSpace: true},
		},
		Action: runSnapshot,
	})
}

func runSnapshot(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	action, name, err := snapshotAction(c)
	if err != nil {
		return err
	}
	args, err := operands(c, 1, "Expecting one image file name")
	if err != nil {
		return err
	}
	// Open's warnings are kept: see below.
	var warnings bytes.Buffer
	op.stderr = io.MultiWriter(op.stderr, &warnings)
	// Only -l opens the image read-only (and may share it with -U).
	img, err := op.open(args[0], "", action == control.SnapshotList || action == control.SnapshotNone, false)
	if err != nil {
		return err
	}
	defer img.Close()
	res, err := control.Snapshot(control.SnapshotOptions{Image: img, Action: action, Name: name})
	if _, ok := img.(formats.Snapshotter); !ok && action == control.SnapshotApply {
		// bdrv_snapshot_goto reopens a driver without snapshots after
		// trying its file, which repeats the open's warnings.
		c.App.ErrWriter.Write(warnings.Bytes())
	}
	if err != nil {
		return err
	}
	// dump_snapshots prints with printf: -q does not silence the list.
	fmt.Fprint(c.App.Writer, res.Human())
	return img.Close()
}

// snapshotAction reads -l, -a, -c and -d, of which qemu-img takes one,
// given once.
func snapshotAction(c *cli.Context) (control.SnapshotAction, string, error) {
	given := c.Count("l")
	action, name := control.SnapshotNone, ""
	if given > 0 {
		action = control.SnapshotList
	}
	for _, f := range []struct {
		flag   string
		action control.SnapshotAction
	}{{"a", control.SnapshotApply}, {"c", control.SnapshotCreate}, {"d", control.SnapshotDelete}} {
		if v := c.StringSlice(f.flag); len(v) > 0 {
			given += len(v)
			action, name = f.action, v[0]
		}
	}
	if given > 1 {
		return 0, "", usageError{"Cannot mix '-l', '-a', '-c', '-d'"}
	}
	return action, name, nil
}
