// Command rbdbench measures snapfs over Ceph RBD (issue 5's benchmarks) on
// a one-node cluster that it starts with the project's
// scripts/ceph/start.sh and always stops, and prints times, throughput,
// peak memory and ratios, medians of -runs:
//
//  1. cat volumes/big/snapshots/s/disk.raw of a -size image full of data
//     through `snapfs mount --pool`, against `rbd export big@s -` to
//     /dev/null and against cat of the same image through rbd-fuse.
//     Targets: at least 1.0 times rbd export's throughput, at least 2
//     times rbd-fuse's.
//  2. cat disk.raw of the snapshot at the end of a clone chain -layers deep
//     (8), whose objects are spread over every image of the chain, against
//     the same content as a flat image. Target: the chain not more than
//     10% slower.
//  3. mkdir volumes/big/snapshots/S (rbd snap create) through the mount,
//     -mkdirs times: p50 and p95.
//
// Each cat runs on a fresh mount (snapfs or rbd-fuse), after the page cache
// is dropped when the harness may (root). The data never touches the local
// disk: it is generated, piped into rbd import and hashed on the way, and
// -verify checks what the mount serves against that hash and against rbd
// export. The cluster keeps its objects in RAM (memstore): it needs about
// -size plus three times -chain-size of memory.
//
// -cases picks the cases to run (case 3 snapshots case 1's image). For a
// quick run while developing, or of the clone chain alone:
//
//	rbdbench -size 256M -chain-size 128M -runs 1
//	rbdbench -cases 2 -runs 5
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// config is what the flags say.
type config struct {
	snapfs  string // the snapfs binary
	scripts string // scripts/ceph of the project
	work    string // cluster, mount points
	runs    int
	// case 1
	size int64
	// case 2: a chain of depth clones of a chainSize image
	chainSize int64
	depth     int
	// case 3
	mkdirs int
	// dropCaches is tried before every run: rbd-fuse reads through the
	// page cache.
	dropCaches bool
	verify     bool
	// cases are the cases to run, by number.
	cases map[int]bool
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "rbdbench:", err)
		os.Exit(2)
	}
	// Ctrl-C cancels the run; run unmounts and stops the cluster before
	// it returns.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "rbdbench:", err)
		if ctx.Err() != nil {
			os.Exit(130)
		}
		os.Exit(1)
	}
}

func parseFlags(args []string) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet("rbdbench", flag.ContinueOnError)
	fs.StringVar(&cfg.snapfs, "snapfs", "bin/snapfs", "the snapfs binary to measure (built with -tags ceph,...)")
	fs.StringVar(&cfg.scripts, "scripts", "scripts/ceph", "the project's scripts/ceph (start.sh, stop.sh)")
	fs.StringVar(&cfg.work, "work", ".bench/rbd", "work directory: the cluster (its logs) and the mount points")
	fs.IntVar(&cfg.runs, "runs", 3, "runs of each command; the median is reported")
	size := fs.String("size", "2G", "size of the image read in case 1, all data")
	chainSize := fs.String("chain-size", "512M", "size of the images of the clone chain of case 2")
	fs.IntVar(&cfg.depth, "layers", 8, "depth of the clone chain of case 2")
	fs.IntVar(&cfg.mkdirs, "mkdirs", 30, "snapshots taken in case 3")
	fs.BoolVar(&cfg.dropCaches, "drop-caches", true, "drop the page cache before each run (needs root)")
	fs.BoolVar(&cfg.verify, "verify", true, "check what the mount serves against the data written and rbd export")
	// Taken for make bench's BENCHFLAGS, which every benchmark gets:
	// nothing of a run is kept (the cluster lives in RAM).
	fs.Bool("keep", true, "ignored: the cluster is in RAM and always stopped")
	cases := fs.String("cases", "1,2,3", "the cases to run, by number, comma-separated (3 needs 1)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg.cases = map[int]bool{}
	for _, c := range strings.Split(*cases, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 || n > 3 {
			return nil, fmt.Errorf("-cases: %q is not a case (1, 2 or 3)", c)
		}
		cfg.cases[n] = true
	}
	for _, s := range []struct {
		flag, val string
		dst       *int64
	}{{"size", *size, &cfg.size}, {"chain-size", *chainSize, &cfg.chainSize}} {
		n, err := measure.ParseSize(s.val)
		if err != nil {
			return nil, fmt.Errorf("-%s: %w", s.flag, err)
		}
		if n%objectSize != 0 {
			return nil, fmt.Errorf("-%s: want a multiple of the RBD object size, %s", s.flag, units.FormatSize(objectSize))
		}
		*s.dst = n
	}
	switch {
	case cfg.runs < 1:
		return nil, errors.New("-runs must be at least 1")
	case cfg.depth < 1:
		return nil, errors.New("-layers must be at least 1")
	case cfg.chainSize < int64(cfg.depth)*objectSize:
		return nil, fmt.Errorf("-chain-size must give each of the %d clones an object (%s)", cfg.depth, units.FormatSize(objectSize))
	case cfg.cases[3] && !cfg.cases[1]:
		return nil, errors.New("-cases: case 3 snapshots case 1's image: run 1 with it")
	case cfg.mkdirs < 2:
		return nil, errors.New("-mkdirs must be at least 2")
	}
	return cfg, nil
}

// objectSize is RBD's default object size, the unit of copy-on-write.
const objectSize = 4 << 20

// bench is one run of the benchmarks.
type bench struct {
	ctx    context.Context
	cfg    *config
	snapfs string
	out    io.Writer
	c      *cluster
	cold   bool
	// verdicts collects one line per target, for the summary.
	verdicts []string
}

func run(ctx context.Context, cfg *config, w io.Writer) (err error) {
	for _, tool := range []string{cfg.snapfs, "rbd", "rbd-fuse", "ceph", "qemu-io", "cat", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s: %w (make bench builds snapfs; make deps installs ceph-common, rbd-fuse, qemu-utils and fuse3)", tool, err)
		}
	}
	snapfs, err := filepath.Abs(cfg.snapfs)
	if err != nil {
		return err
	}
	if cfg.work, err = filepath.Abs(cfg.work); err != nil {
		return err
	}
	if cfg.scripts, err = filepath.Abs(cfg.scripts); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.work, 0o755); err != nil {
		return err
	}
	b := &bench{ctx: ctx, cfg: cfg, snapfs: snapfs, out: w}
	b.cold = cfg.dropCaches && measure.DropCaches() == nil

	// Room for the objects of case 1 and 2 (the chain's base, its flat
	// copy, the clones' objects), and the snapshots of case 3 (none:
	// they share the objects).
	storeBytes := cfg.size + 3*cfg.chainSize + 1<<30
	b.c, err = startCluster(ctx, cfg.scripts, filepath.Join(cfg.work, "cluster"), storeBytes)
	if err != nil {
		return err
	}
	defer func() {
		if stopErr := b.c.stop(); err == nil {
			err = stopErr
		}
	}()

	fmt.Fprintf(w, "rbdbench: snapfs mount --pool against rbd export and rbd-fuse on a one-node memstore cluster, median of %d runs\n", cfg.runs)
	if b.cold {
		fmt.Fprintln(w, "  the page cache is dropped before each run")
	} else {
		fmt.Fprintln(w, "  the page cache is not dropped (needs root, or -drop-caches=false): the mounts are fresh for each run")
	}
	for i, c := range []func() error{b.throughput, b.chain, b.mkdirLatency} {
		if !cfg.cases[i+1] {
			continue
		}
		if err := c(); err != nil {
			return err
		}
	}
	b.summary()
	return nil
}
