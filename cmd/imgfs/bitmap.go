package main

import (
	"errors"
	"flag"

	"github.com/urfave/cli/v2"

	"github.com/imgfs/imgfs/control"
)

func init() {
	flags := []cli.Flag{
		objectFlag(), imageOptsFlag(), formatFlag("f", false),
		&cli.StringFlag{Name: "b", Usage: "image to merge a bitmap from"},
		&cli.StringFlag{Name: "F", Usage: "format of the -b image"},
		&cli.StringFlag{Name: "g", Usage: "granularity of an added bitmap"},
	}
	for _, name := range []string{"add", "remove", "clear", "enable", "disable", "merge"} {
		flags = append(flags, &actionFlag{name: name, takesValue: name == "merge"})
	}
	commands = append(commands, &cli.Command{
		Name:   "bitmap",
		Usage:  "change the persistent bitmaps of an image",
		Flags:  flags,
		Action: runBitmap,
	})
}

// actionFlag is one of bitmap's action options. qemu-img applies the
// actions in command-line order, which urfave/cli does not keep, so
// every action flag of one parse appends to a shared list registered in
// the flag set under actionsKey.
type actionFlag struct {
	name       string
	takesValue bool
}

const actionsKey = "\x00bitmap-actions"

// actionList collects the actions of one parse; it is the hidden flag
// under actionsKey and what every action flag's Get returns.
type actionList struct{ list []control.BitmapAction }

func (l *actionList) String() string   { return "" }
func (l *actionList) Set(string) error { return nil }
func (l *actionList) Get() any         { return l }

type actionValue struct {
	op      string
	isBool  bool
	actions *actionList
}

func (v *actionValue) String() string { return "" }
func (v *actionValue) Get() any       { return v.actions }
func (v *actionValue) IsBoolFlag() bool {
	return v.isBool
}

func (v *actionValue) Set(s string) error {
	a := control.BitmapAction{Op: v.op}
	if !v.isBool {
		a.Source = s
	}
	v.actions.list = append(v.actions.list, a)
	return nil
}

func (f *actionFlag) Apply(set *flag.FlagSet) error {
	var l *actionList
	if fl := set.Lookup(actionsKey); fl != nil {
		l, _ = fl.Value.(*actionList)
	} else {
		l = &actionList{}
		set.Var(l, actionsKey, "")
	}
	set.Var(&actionValue{op: f.name, isBool: !f.takesValue, actions: l}, f.name, f.String())
	return nil
}

func (f *actionFlag) Names() []string  { return []string{f.name} }
func (f *actionFlag) IsSet() bool      { return false }
func (f *actionFlag) IsBoolFlag() bool { return !f.takesValue }
func (f *actionFlag) String() string {
	if f.takesValue {
		return "--merge SOURCE\tmerge bitmap SOURCE into the bitmap"
	}
	return "--" + f.name + "\t" + f.name + " the bitmap"
}

// runBitmap is img_bitmap: checks in qemu-img's order, then the actions
// in the order given.
func runBitmap(c *cli.Context) error {
	op, err := newOpener(c)
	if err != nil {
		return err
	}
	var granularity int64
	if c.IsSet("g") {
		if granularity, err = sizeArg("granularity", c.String("g")); err != nil {
			return err
		}
	}
	var actions []control.BitmapAction
	if l, ok := c.Value("add").(*actionList); ok {
		actions = l.list
	}
	has := func(op string) bool {
		for _, a := range actions {
			if a.Op == op {
				return true
			}
		}
		return false
	}
	srcFile, srcFmt := c.String("b"), c.String("F")
	switch {
	case len(actions) == 0:
		return errors.New("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
	case granularity != 0 && !has("add"):
		return errors.New("granularity only supported with --add")
	case srcFmt != "" && srcFile == "":
		return errors.New("-F only supported with -b")
	case srcFile != "" && !has("merge"):
		return errors.New("Merge bitmap source file only supported with --merge")
	case c.NArg() != 2:
		return errors.New("Expecting filename and bitmap name")
	}
	img, err := op.open(c.Args().Get(0), c.String("f"), false, false)
	if err != nil {
		return err
	}
	defer img.Close()
	o := control.BitmapOptions{Image: img, Bitmap: c.Args().Get(1), Actions: actions, Granularity: granularity}
	if srcFile != "" {
		// img_bitmap opens -b read-only and never with --image-opts.
		src, err := (&opener{forceShare: op.forceShare, secrets: op.secrets, stderr: op.stderr}).open(srcFile, srcFmt, true, false)
		if err != nil {
			return err
		}
		defer src.Close()
		o.Source = src
	}
	if err := control.Bitmap(o); err != nil {
		return err
	}
	return img.Close()
}
