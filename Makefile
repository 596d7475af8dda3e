# snapfs: `make run` shows it working, `make test` is what CI runs.
#
#   make deps    install what building and testing need (idempotent)
#   make build   bin/snapfs, one static binary
#   make test    vet, every test, then each fuzz target for FUZZTIME inputs
#   make bench   benchmarks against qemu-img (BENCHFLAGS for smaller runs)
#   make run     mount the default store at ./mnt (the README's first command)
#   make demo    show snapfs info and convert on a generated qcow2 chain
#   make fmt     gofmt every file
#   make clean   remove what the targets above made

# Go may be installed where a non-login shell (CI) does not look.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
FUZZTIME ?= 30000x
BENCHFLAGS ?=
MOUNTBENCHFLAGS ?=

# bin/snapfs holds the Ceph RBD backend and the libvirt instance provider,
# which need cgo, librbd and libvirt: TAGS names them ("ceph" plus the Ceph
# release go-ceph compiles against: rbdio/doc.go has the table; Debian 12
# ships Ceph 16, "pacific"; "libvirt" for package virt). qcow, snapshot and
# fs build without cgo (TestPureGo in cmd/snapfs checks it), and so does
# everything with TAGS= CGO=0, minus Ceph and libvirt.
TAGS ?= ceph,pacific,libvirt
CGO ?= 1

.PHONY: all deps build test vet fuzz bench run demo fmt clean

all: build

deps:
	bash scripts/deps.sh

build:
	CGO_ENABLED=$(CGO) $(GO) build -tags '$(TAGS)' -o bin/snapfs ./cmd/snapfs

vet:
	CGO_ENABLED=0 $(GO) vet ./...
	CGO_ENABLED=$(CGO) $(GO) vet -tags '$(TAGS)' ./...

test: deps build vet
	CGO_ENABLED=$(CGO) $(GO) test -tags '$(TAGS)' ./... -count=1 -timeout 45m
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

fuzz:
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

# The engine (qcowbench, issue 2), then the mount (mountbench, issue 3).
# Both take -size, -layers, -runs, -drop-caches, -verify and -keep, so
# BENCHFLAGS='-size 256M -runs 1' makes a quick run of both;
# MOUNTBENCHFLAGS goes to mountbench alone (-depth-size 128M, -cases 23).
# Then issue 4 (bytes read per byte changed by an incremental export of a
# 10 GiB volume; clone reads 16 deep against a flat volume, in-process and
# through a mount) and, last,
# issue 6: mkdir latency and frozen window on a running 2-disk guest
# of a private libvirtd (virt's BenchmarkSnapshotRunning).
bench: deps build
	CGO_ENABLED=0 $(GO) build -o bin/qcowbench ./bench/cmd/qcowbench
	CGO_ENABLED=0 $(GO) build -o bin/mountbench ./bench/cmd/mountbench
	./bin/qcowbench -snapfs bin/snapfs -work .bench $(BENCHFLAGS)
	./bin/mountbench -snapfs bin/snapfs -work .bench/mount $(BENCHFLAGS) $(MOUNTBENCHFLAGS)
	CGO_ENABLED=0 $(GO) build -o bin/rbdbench ./bench/cmd/rbdbench
	./bin/rbdbench -snapfs bin/snapfs -work .bench/rbd $(BENCHFLAGS) $(RBDBENCHFLAGS)
	SNAPFS_BENCH_GIB=10 $(GO) test -run '^$$' -bench 'IncrementalExport|CloneRead' -benchtime 3x ./snapshot
	$(GO) test -run '^$$' -bench CloneReadMount -benchtime 9x ./fs
	CGO_ENABLED=1 $(GO) test -tags libvirt -run '^$$' -bench SnapshotRunning -benchtime 20x ./virt

run: deps build
	bash scripts/run.sh bin/snapfs mnt

# The engine alone: info and convert on a qcow2 chain made with qemu-img.
demo: build
	bash scripts/demo.sh bin/snapfs .run

fmt:
	gofmt -w $$(git ls-files --cached --others --exclude-standard '*.go')

clean:
	rm -rf bin .bench .run
