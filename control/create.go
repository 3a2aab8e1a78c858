package control

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"

	"github.com/imgfs/imgfs/formats"
)

// CreateOptions are the inputs of `create` (qemu-img's img_create and
// block.c's bdrv_img_create).
type CreateOptions struct {
	Filename string
	// Format is the driver name; "" means raw.
	Format string
	// Size is the virtual size; negative means not given (then it comes
	// from -o size or the backing image).
	Size int64
	// BackingFile and BackingFormat are -b and -F.
	BackingFile, BackingFormat string
	// BackingGiven: -b was given, even as an empty name (which QEMU
	// refuses with its own message).
	BackingGiven bool
	// NoBackingOpen is -u: the backing image is not opened, so its
	// format and size are not checked.
	NoBackingOpen bool
	// Options is the -o option list, several -o already joined by ','.
	Options string
	// Secrets holds the --object secrets by id, for options that name
	// one (luks' key-secret).
	Secrets map[string][]byte
}

// CreatePlan is a checked `create`: what the "Formatting" line shows and
// what Run creates. QEMU prints the line before it creates the image, so
// the caller prints String and then calls Run.
type CreatePlan struct {
	Filename string
	Format   string
	driver   *formats.Driver
	opts     *formats.Options
}

// MissingBackingFormatError is a backing file given without its format,
// which QEMU 7.2 refuses. Detected is the format found by opening the
// backing image ("" with -u).
type MissingBackingFormatError struct{ Detected string }

func (e *MissingBackingFormatError) Error() string {
	const msg = "Backing file specified without backing format"
	if e.Detected == "" {
		return msg
	}
	return msg + "\nDetected format of " + e.Detected + "."
}

// PlanCreate checks a create request in the order bdrv_img_create does
// and opens the backing image (unless NoBackingOpen) for its format and
// size. Errors read like QEMU's, without the file name prefix qemu-img
// adds.
func PlanCreate(o CreateOptions) (*CreatePlan, error) {
	format := o.Format
	if format == "" {
		format = "raw"
	}
	d := formats.Lookup(format)
	if d == nil {
		return nil, fmt.Errorf("Unknown file format '%s'", format)
	}
	if d.Create == nil || d.ReadOnly {
		return nil, fmt.Errorf("Format driver '%s' does not support image creation", format)
	}
	opts := formats.NewOptions(d.CreateSpecs())
	opts.Secrets = o.Secrets
	if err := opts.Parse(o.Options); err != nil {
		return nil, err
	}
	if o.Size >= 0 {
		if opts.Has("size") {
			return nil, errors.New("The image size must be specified only once")
		}
		if err := opts.Set("size", strconv.FormatInt(o.Size, 10)); err != nil {
			return nil, err
		}
	}
	if err := setBacking(opts, format, o.BackingFile, o.BackingGiven, o.BackingFormat); err != nil {
		return nil, err
	}
	backing, backingFmt := opts.String("backing_file"), opts.String("backing_fmt")
	if opts.Has("backing_file") {
		if backing == o.Filename {
			return nil, errors.New("Error: Trying to create an image with the same filename as the backing file")
		}
		if backing == "" {
			return nil, errors.New("Expected backing file name, got empty string")
		}
	}
	switch {
	case backing != "" && !o.NoBackingOpen:
		img, err := formats.Open(formats.BackingPath(o.Filename, backing), formats.OpenOptions{
			Format:     backingFmt,
			ReadOnly:   true,
			ForceShare: true,
		})
		if err != nil {
			return nil, fmt.Errorf("%w\nCould not open backing image.", err)
		}
		size, detected := img.Size(), img.Format()
		img.Close()
		if backingFmt == "" {
			return nil, &MissingBackingFormatError{Detected: detected}
		}
		if !opts.Has("size") {
			if err := opts.Set("size", strconv.FormatInt(size, 10)); err != nil {
				return nil, err
			}
		}
	case backing != "" && backingFmt == "":
		return nil, &MissingBackingFormatError{}
	}
	if !opts.Has("size") {
		return nil, errors.New("Image creation needs a size parameter")
	}
	return &CreatePlan{Filename: o.Filename, Format: format, driver: d, opts: opts}, nil
}

// setBacking stores -b and -F in a format's creation options, as
// qemu-img's add_old_style_options does; given says -b was used even if
// name is empty.
func setBacking(opts *formats.Options, format, name string, given bool, backingFmt string) error {
	if name != "" || given {
		if err := opts.Set("backing_file", name); err != nil {
			return fmt.Errorf("Backing file not supported for file format '%s'", format)
		}
	}
	if backingFmt != "" {
		if err := opts.Set("backing_fmt", backingFmt); err != nil {
			return fmt.Errorf("Backing file format not supported for file format '%s'", format)
		}
	}
	return nil
}

// String is the line qemu-img prints before creating, without its
// newline: `Formatting 'NAME', fmt=FMT name=value ...`.
func (p *CreatePlan) String() string {
	return fmt.Sprintf("Formatting '%s', fmt=%s %s", p.Filename, p.Format, p.opts.Summary())
}

// Run creates the image.
func (p *CreatePlan) Run() error {
	return createImage(p.driver, p.Filename, p.opts)
}

// createImage runs a driver's Create and turns "file too large" into
// QEMU's clearer message, which hints at the cluster size when one was
// given (bdrv_img_create's -EFBIG case).
func createImage(d *formats.Driver, filename string, opts *formats.Options) error {
	err := d.Create(filename, opts)
	if errors.Is(err, syscall.EFBIG) {
		hint := ""
		// Like QEMU, the default cluster size counts.
		if n, ok := opts.Uint("cluster_size"); ok && n != 0 {
			hint = " (try using a larger cluster size)"
		}
		return fmt.Errorf("The image size is too large for file format '%s'%s", d.Name, hint)
	}
	return err
}

// OptionHelp is `-o help` for format: with a target file name, the
// format's options merged with the protocol's ("Supported options:");
// without one, only the format's, and a note about the protocol level.
func OptionHelp(format string, withProtocol bool) (string, error) {
	d := formats.Lookup(format)
	if d == nil {
		return "", fmt.Errorf("Unknown file format '%s'", format)
	}
	if d.Create == nil || d.ReadOnly {
		return "", fmt.Errorf("Format driver '%s' does not support image creation", format)
	}
	if withProtocol {
		return formats.Help(d.CreateSpecs()), nil
	}
	lines := strings.TrimPrefix(formats.Help(d.CreateOptions), "Supported options:\n")
	return "Supported " + format + " options:\n" + lines +
		"\nThe protocol level may support further options.\n" +
		"Specify the target filename to include those options.\n", nil
}
