#!/usr/bin/env bash
# Runs every fuzz target of the module for a bounded time each (FUZZTIME,
# default 10s): the targets are found with `go test -list`, so a new Fuzz*
# function is fuzzed in CI without anyone listing it here. A crash fails the
# run and leaves the input in the package's testdata/fuzz/ as a regression
# test for `go test`.
set -euo pipefail

fuzztime=${FUZZTIME:-10s}
go list -f '{{.ImportPath}} {{.Dir}}' ./... | while read -r pkg dir; do
	# Only packages whose tests mention a fuzz function are listed: -list
	# runs each package's TestMain, which may be slow.
	grep -qs '^func Fuzz' "$dir"/*_test.go || continue
	# -list prints the matching names, then "ok <pkg> <time>".
	targets=$(go test -list '^Fuzz' "$pkg" </dev/null | grep '^Fuzz' || true)
	for target in $targets; do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 2s "$pkg" </dev/null
	done
done
