#!/bin/bash
# fuzz.sh [FUZZTIME]: runs every Fuzz target of the module for FUZZTIME
# (default 5s) each. A crash fails the script and go test saves the input
# under the package's testdata/fuzz/, where it becomes a regression case.
set -euo pipefail
fuzztime=${1:-5s}

# The integration tests package is left out: listing its tests would run
# its TestMain, which builds imgfs, and it holds no fuzz targets.
mapfile -t pkgs < <(go list ./... | grep -v '/tests$')

# `go test -list` prints a package's matching names, then "ok <pkg> ...".
go test -list '^Fuzz' "${pkgs[@]}" |
	awk '/^Fuzz/ { names = names " " $1 }
	     /^ok/   { if (names != "") print $2 names; names = "" }' |
	while read -r pkg targets; do
		for target in $targets; do
			echo "fuzz: $pkg $target ($fuzztime)"
			go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
		done
	done
