#!/usr/bin/env bash
# Runs every fuzz target of the module for a bounded number of inputs each
# (FUZZTIME, default 30000x: about 5 to 15 s here). A count, not a duration:
# with a duration, Go 1.26's fuzzing coordinator can report "context
# deadline exceeded" as a failure when the time runs out while a worker is
# busy on a loaded machine (golang/go#75804, fixed in Go 1.27). The targets are found with `go test -list`, so a new Fuzz*
# function is fuzzed in CI without anyone listing it here. A crash fails the
# run and leaves the input in the package's testdata/fuzz/ as a regression
# test for `go test`.
set -euo pipefail

fuzztime=${FUZZTIME:-30000x}
go list -f '{{.ImportPath}} {{.Dir}}' ./... | while read -r pkg dir; do
	# Only packages whose tests mention a fuzz function are listed: -list
	# runs each package's TestMain, which may be slow.
	grep -qs '^func Fuzz' "$dir"/*_test.go || continue
	# -list prints the matching names, then "ok <pkg> <time>".
	targets=$(go test -list '^Fuzz' "$pkg" </dev/null | grep '^Fuzz' || true)
	for target in $targets; do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 1000x "$pkg" </dev/null
	done
done
