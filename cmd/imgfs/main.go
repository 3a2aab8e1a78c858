// Command imgfs is a drop-in replacement for qemu-img that can also mount
// a directory of disk images as a FUSE filesystem.
//
// Each qemu-img command lives in its own file and adds itself to commands
// from init. Arguments are normalised by getopt (getopt.go) first, so that
// options may follow file names and short options may be clustered, as
// qemu-img's getopt_long allows.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	_ "github.com/imgfs/imgfs/formats/all"
)

// commands is filled by init functions of the command files.
var commands []*cli.Command

// lastOperand names the commands whose last argument is an operand
// taken off the command line before options are parsed, as img_resize
// does with the size so that "-1G" is not read as an option. They need
// at least two arguments. permute ends options with "--", so the
// operand goes after the others.
var lastOperand = map[string]bool{}

// prog is the name error messages start with: the name we were invoked
// by, so that a symlink named qemu-img prints "qemu-img: ...".
var prog = "imgfs"

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

// run executes one command line. stdout is buffered like C's stdio when
// it is not a terminal, so that messages on stderr come out ahead of the
// report as they do with qemu-img writing into a pipe.
func run(args []string, stdout, stderr io.Writer) int {
	if f, ok := stdout.(*os.File); !ok || !isTerminal(f) {
		out := bufio.NewWriter(stdout)
		defer out.Flush()
		stdout = out
	}
	if len(args) > 0 {
		prog = filepath.Base(args[0])
	}
	app := newApp(stdout, stderr)
	// mount(8) and mount.fuse3 run imgfs as a mount helper (mount.go).
	args, err := mountHelperArgs(args, func(name string) bool { return app.Command(name) != nil })
	if err != nil {
		return exitCode(err, stderr)
	}
	args, err = skipTraceOptions(args, stderr)
	if err != nil {
		return exitCode(err, stderr)
	}
	if len(args) < 2 {
		fmt.Fprintf(stderr, "%s: Not enough arguments\nTry '%s --help' for more information\n", prog, prog)
		return 1
	}
	switch args[1] {
	case "-h", "--help":
		fmt.Fprint(stdout, programHelp())
		return 0
	case "-V", "--version":
		fmt.Fprint(stdout, versionText())
		return 0
	}
	cmd := app.Command(args[1])
	if cmd == nil {
		fmt.Fprintf(stderr, "%s: Command not found: %s\nTry '%s --help' for more information\n", prog, args[1], prog)
		return 1
	}
	rest, last := args[2:], []string(nil)
	if lastOperand[cmd.Name] {
		if len(rest) < 2 {
			fmt.Fprintf(stderr, "%s: Not enough arguments\nTry '%s --help' for more information\n", prog, prog)
			return 1
		}
		rest, last = rest[:len(rest)-1], rest[len(rest)-1:]
	}
	norm, err := permute(cmd, rest)
	if errors.Is(err, errHelp) {
		fmt.Fprint(stdout, programHelp())
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\nTry '%s --help' for more information\n", prog, err, prog)
		return 1
	}
	err = app.Run(append(append([]string{args[0], args[1]}, norm...), last...))
	return exitCode(err, stderr)
}

// skipTraceOptions takes qemu-img's global -T/--trace options off the
// front of args. imgfs has no QEMU trace events, so each one is accepted
// with a warning and the command runs untraced, as scripts that pass
// trace options expect it to run.
func skipTraceOptions(args []string, stderr io.Writer) ([]string, error) {
	for len(args) > 1 {
		a := args[1]
		var value string
		switch {
		case a == "-T" || a == "--trace":
			if len(args) < 3 {
				return nil, usageError{fmt.Sprintf("missing argument for option '%s'", a)}
			}
			value, args = args[2], append(args[:1:1], args[3:]...)
		case strings.HasPrefix(a, "--trace="):
			value, args = a[len("--trace="):], append(args[:1:1], args[2:]...)
		case strings.HasPrefix(a, "-T"):
			value, args = a[2:], append(args[:1:1], args[2:]...)
		default:
			return args, nil
		}
		fmt.Fprintf(stderr, "%s: warning: tracing is not supported, ignoring trace option '%s'\n", prog, value)
	}
	return args, nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// flush pushes out buffered stdout, for output that must appear at once
// (the progress line), as QEMU's fflush(stdout).
func flush(w io.Writer) {
	if f, ok := w.(interface{ Flush() error }); ok {
		f.Flush()
	}
}

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:            prog,
		Usage:           "QEMU disk image utility",
		Commands:        commands,
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		HideVersion:     true,
		// qemu-img option values (--object, -o) contain commas.
		DisableSliceFlagSeparator: true,
		// Errors are printed by exitCode in qemu-img's format.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}

// exitStatus is an error that carries a specific exit code. A nil Err
// means the message was already printed (check's and compare's reports).
type exitStatus struct {
	code int
	err  error
}

func (e *exitStatus) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

// withCode makes err exit with code instead of 1.
func withCode(code int, err error) error { return &exitStatus{code: code, err: err} }

// usageError is a wrong command line; it adds qemu-img's "Try --help" hint.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	code := 1
	var es *exitStatus
	if errors.As(err, &es) {
		code = es.code
		err = es.err
	}
	if err == nil {
		return code
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "%s: %s\nTry '%s --help' for more information\n", prog, ue.msg, prog)
		return code
	}
	fmt.Fprintf(stderr, "%s: %v\n", prog, err)
	return code
}
