# snapfs: `make run` shows it working, `make test` is what CI runs.
#
#   make deps    install what building and testing need (idempotent)
#   make build   bin/snapfs, one static binary
#   make test    vet, every test, then each fuzz target for FUZZTIME
#   make bench   benchmarks against qemu-img (BENCHFLAGS for smaller runs)
#   make run     mount the default store at ./mnt (the README's first command)
#   make demo    show snapfs info and convert on a generated qcow2 chain
#   make fmt     gofmt every file
#   make clean   remove what the targets above made

# Go may be installed where a non-login shell (CI) does not look.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
FUZZTIME ?= 10s
BENCHFLAGS ?=

# bin/snapfs is built without cgo for now: one static binary that runs
# anywhere. Tests use the Go default (cgo on where gcc is), so that cgo
# backends (Ceph, libvirt) can be tested; TestPureGo (cmd/snapfs) checks that qcow,
# snapshot and fs still build with CGO_ENABLED=0.
BUILD_CGO ?= 0

.PHONY: all deps build test vet fuzz bench run demo fmt clean

all: build

deps:
	bash scripts/deps.sh

build:
	CGO_ENABLED=$(BUILD_CGO) $(GO) build -o bin/snapfs ./cmd/snapfs

vet:
	$(GO) vet ./...

test: deps build vet
	$(GO) test ./... -count=1 -timeout 30m
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

fuzz:
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

bench: deps build
	CGO_ENABLED=0 $(GO) build -o bin/qcowbench ./bench/cmd/qcowbench
	./bin/qcowbench -snapfs bin/snapfs -work .bench $(BENCHFLAGS)

run: deps build
	bash scripts/run.sh bin/snapfs mnt

# The engine alone: info and convert on a qcow2 chain made with qemu-img.
demo: build
	bash scripts/demo.sh bin/snapfs .run

fmt:
	gofmt -w $$(git ls-files --cached --others --exclude-standard '*.go')

clean:
	rm -rf bin .bench .run
