package control

import (
	"errors"
	"fmt"
	"strings"

	"github.com/imgfs/imgfs/formats"
)

// AmendOptions are the inputs of `amend` (qemu-img.c img_amend).
type AmendOptions struct {
	Image formats.Image
	// Options is the -o list.
	Options string
	// Force is --force.
	Force bool
	// Secrets holds the data of --object secret definitions by id, for
	// the LUKS keyslot options that name them.
	Secrets map[string][]byte
	// Progress, when not nil, follows the driver's work.
	Progress Progress
}

// errNoAmend is print_amend_option_help's and img_amend's message for a
// format that cannot amend.
func errNoAmend(format string) error {
	return formats.Errorf(formats.ErrUnsupported, "Format driver '%s' does not support option amendment", format)
}

// AmendHelp is print_amend_option_help: the options amend takes for
// format, as "-o help" lists them.
func AmendHelp(format string) (string, error) {
	d := formats.Lookup(format)
	if d == nil {
		return "", fmt.Errorf("Unknown file format '%s'", format)
	}
	if d.AmendOptions == nil {
		return "", errNoAmend(format)
	}
	lines := strings.TrimPrefix(formats.Help(d.AmendOptions), "Supported options:\n")
	return "Amend options for '" + format + "':\n" + lines, nil
}

// Amend parses the options against the driver's amend options and
// applies them. Options that only creation takes get QEMU's hint.
func Amend(o AmendOptions) error {
	format := o.Image.Format()
	d := formats.Lookup(format)
	a, ok := o.Image.(formats.Amender)
	if d == nil || d.AmendOptions == nil || !ok {
		return errNoAmend(format)
	}
	opts := formats.NewOptions(d.AmendOptions)
	opts.Secrets = o.Secrets
	if err := opts.Parse(o.Options); err != nil {
		// QEMU tries the list again against the creation options (its
		// table then also holds the amend options, as observed with
		// "encrypt.keyslot=1,cluster_size=4k").
		all := append(append([]formats.OptionSpec(nil), d.CreateOptions...), d.AmendOptions...)
		if formats.NewOptions(all).Parse(o.Options) == nil {
			return fmt.Errorf("%w\nThis option is only supported for image creation", err)
		}
		return err
	}
	// img_amend reports 0% before the driver runs and 100% after it,
	// also when it fails.
	o.Progress.report(0, 1)
	err := a.Amend(opts, o.Force, o.Progress)
	o.Progress.report(1, 1)
	return err
}

// ErrAmendNoOptions is img_amend's usage error without -o.
var ErrAmendNoOptions = errors.New("Must specify options (-o)")
