package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// errHelp: the command line asked for help (-h or --help); qemu-img
// prints the program help and exits 0 wherever that option appears.
var errHelp = errors.New("help requested")

// permute rewrites a command's arguments the way glibc's getopt_long
// reads them, into a form urfave/cli parses: options first, each as
// "-name" or "-name=value", then "--" and the operands in order. It
// supports options after operands, clustered short options ("-pq"),
// attached values ("-fqcow2", "--output=json"), unambiguous abbreviations
// of long options ("--outp=json") and "--" to end options. Errors carry
// qemu-img's wording, which quotes argv[optind-1] as getopt leaves it.
func permute(cmd *cli.Command, args []string) ([]string, error) {
	takesValue := map[string]bool{}
	var long []string
	for _, f := range cmd.Flags {
		_, isBool := f.(*cli.BoolFlag)
		if b, ok := f.(interface{ IsBoolFlag() bool }); ok {
			isBool = b.IsBoolFlag()
		}
		for _, n := range f.Names() {
			takesValue[n] = !isBool
			if len(n) > 1 {
				long = append(long, n)
			}
		}
	}
	var opts, operands []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			operands = append(operands, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "--"):
			name, value, hasValue := strings.Cut(a[2:], "=")
			if name == "help" {
				return nil, errHelp
			}
			name, ok := matchLong(long, name)
			if !ok || !takesValue[name] && hasValue {
				return nil, fmt.Errorf("unrecognized option '%s'", a)
			}
			if !takesValue[name] {
				opts = append(opts, "--"+name)
				continue
			}
			if !hasValue {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("missing argument for option '%s'", a)
				}
				i++
				value = args[i]
			}
			opts = append(opts, "--"+name+"="+value)
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				name := a[j : j+1]
				if name == "h" {
					return nil, errHelp
				}
				needs, known := takesValue[name]
				if !known {
					// getopt moves past the cluster only at its last
					// character; before that argv[optind-1] is the
					// previous argument (the command name for the first).
					quoted := a
					if j < len(a)-1 {
						quoted = cmd.Name
						if i > 0 {
							quoted = args[i-1]
						}
					}
					return nil, fmt.Errorf("unrecognized option '%s'", quoted)
				}
				if !needs {
					opts = append(opts, "-"+name)
					continue
				}
				value := a[j+1:]
				if value == "" {
					if i+1 >= len(args) {
						return nil, fmt.Errorf("missing argument for option '%s'", a)
					}
					i++
					value = args[i]
				}
				opts = append(opts, "-"+name+"="+value)
				break
			}
		default:
			operands = append(operands, a)
		}
	}
	return append(append(opts, "--"), operands...), nil
}

// matchLong resolves a long option name or an unambiguous prefix of one.
func matchLong(long []string, name string) (string, bool) {
	match := ""
	for _, l := range long {
		if l == name {
			return l, true
		}
		if strings.HasPrefix(l, name) && name != "" {
			if match != "" {
				return "", false
			}
			match = l
		}
	}
	return match, match != ""
}
