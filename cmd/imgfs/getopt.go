package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// permute rewrites a command's arguments the way glibc's getopt_long
// reads them, into a form urfave/cli parses: options first, each as
// "-name" or "-name=value", then "--" and the operands in order. It
// supports options after operands, clustered short options ("-pq"),
// attached values ("-fqcow2", "--output=json") and "--" to end options.
// Unknown options and missing values give getopt's messages as qemu-img
// prints them.
func permute(cmd *cli.Command, args []string) ([]string, error) {
	takesValue := map[string]bool{}
	for _, f := range cmd.Flags {
		_, isBool := f.(*cli.BoolFlag)
		for _, n := range f.Names() {
			takesValue[n] = !isBool
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
			needs, known := takesValue[name]
			if !known || len(name) == 1 {
				return nil, fmt.Errorf("unrecognized option '%s'", a)
			}
			if !needs {
				if hasValue {
					return nil, fmt.Errorf("option '--%s' doesn't allow an argument", name)
				}
				opts = append(opts, "--"+name)
				continue
			}
			if !hasValue {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("option '%s' requires an argument", a)
				}
				i++
				value = args[i]
			}
			opts = append(opts, "--"+name+"="+value)
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				name := a[j : j+1]
				needs, known := takesValue[name]
				if !known {
					return nil, fmt.Errorf("unrecognized option '%s'", a)
				}
				if !needs {
					opts = append(opts, "-"+name)
					continue
				}
				value := a[j+1:]
				if value == "" {
					if i+1 >= len(args) {
						return nil, fmt.Errorf("option '%s' requires an argument", a)
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
