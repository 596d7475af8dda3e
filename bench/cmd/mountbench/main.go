// Command mountbench measures snapfs through a real FUSE mount against
// qemu-img doing the same work on the same store, in one run (issue 3's
// benchmarks), and prints times, throughput, peak memory and ratios:
//
//  1. cat volumes/V/snapshots/S/disk.raw of a dense chain of 8 layers, to
//     /dev/null and to a file, against qemu-img convert -O raw of the same
//     chain (to a null device and to a file). Target: at least qemu-img's
//     throughput.
//  2. reading disk.raw of a chain 1 deep and of one 64 deep holding the
//     same data, spread evenly over the layers of the deep one. Target:
//     depth 64 reads at 0.9 times the speed of depth 1 or better.
//  3. mkdir volumes/V/snapshots/S on a 1 GiB and a 100 GiB volume, both
//     sparse with the same data. Target: the same latency within noise,
//     p50 under 20 ms.
//  4. cp of a dense qcow2 into import/ against qemu-img convert -O qcow2
//     of the same file into the same filesystem. Target: at least
//     qemu-img's speed.
//
// It builds the store under -work with the snapfs CLI and qemu-io (volume
// create, writes into the head, snapshot create: real store chains), keeps
// it for the next run unless -keep=false, mounts it with snapfs mount in a
// child process and always unmounts it, on failure and on Ctrl-C too.
// Every command runs -runs times and the median is reported. Before each
// cold run the page cache is dropped when the harness may (root); runs
// marked "layers cached" read the store's layer files from the page cache
// (both tools) after evicting the mount's own cache of the export, so that
// they measure snapfs and not the disk. Peak RSS is the mount process's
// (VmHWM, reset before each measurement) against qemu-img's (rusage).
//
// Sizes take K, M, G, T suffixes (powers of 1024). For a quick run while
// developing:
//
//	mountbench -size 256M -depth-size 128M -runs 1
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
	"strings"
	"syscall"

	"snapfs/bench/internal/fuseproc"
	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// config is what the flags say.
type config struct {
	snapfs string // the snapfs binary
	work   string // store, mount point and images go here
	runs   int
	cases  string // which cases to run: digits from "1234"
	// case 1 (dense chain) and case 4 (import)
	size   int64
	layers int
	// case 2
	depthSize int64
	depth     int
	// case 3
	mkdirSmall, mkdirBig, mkdirData int64
	mkdirs                          int
	// dropCaches is tried before every cold run; without it only the runs
	// with the layers cached are made.
	dropCaches bool
	verify     bool // check what the mount serves against qemu-img
	keep       bool // keep the store's big volumes for the next run

	// onMounted, when set, is called once the mount is up (tests).
	onMounted func()
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "mountbench:", err)
		os.Exit(2)
	}
	// Ctrl-C cancels the run; run unmounts before it returns. The mount
	// process sits in a process group of its own, so the terminal's
	// SIGINT reaches only this process and the command being measured.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mountbench:", err)
		if ctx.Err() != nil {
			os.Exit(130)
		}
		os.Exit(1)
	}
}

func parseFlags(args []string) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet("mountbench", flag.ContinueOnError)
	fs.StringVar(&cfg.snapfs, "snapfs", "bin/snapfs", "the snapfs binary to measure")
	fs.StringVar(&cfg.work, "work", ".bench/mount", "work directory: store, mount point, images")
	fs.IntVar(&cfg.runs, "runs", 3, "runs of each command; the median is reported")
	fs.StringVar(&cfg.cases, "cases", "1234", "cases to run (1: cat vs qemu-img, 2: depth 1 vs deep, 3: mkdir latency, 4: import)")
	size := fs.String("size", "2G", "virtual size of the dense chain (case 1) and of the imported qcow2 (case 4)")
	fs.IntVar(&cfg.layers, "layers", 8, "layers of the dense chain")
	depthSize := fs.String("depth-size", "1G", "data in each of the chains of case 2")
	fs.IntVar(&cfg.depth, "depth", 64, "layers of the deep chain of case 2")
	mkdirSmall := fs.String("mkdir-small", "1G", "virtual size of the small volume of case 3")
	mkdirBig := fs.String("mkdir-big", "100G", "virtual size of the big volume of case 3")
	mkdirData := fs.String("mkdir-data", "64M", "data in each volume of case 3")
	fs.IntVar(&cfg.mkdirs, "mkdirs", 30, "snapshots taken on each volume of case 3")
	fs.BoolVar(&cfg.dropCaches, "drop-caches", true, "drop the page cache before each cold run (needs root)")
	fs.BoolVar(&cfg.verify, "verify", true, "check the mount's exports and imports against qemu-img")
	fs.BoolVar(&cfg.keep, "keep", true, "keep the store's big volumes in -work for the next run")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, s := range []struct {
		flag string
		val  string
		dst  *int64
	}{{"size", *size, &cfg.size}, {"depth-size", *depthSize, &cfg.depthSize},
		{"mkdir-small", *mkdirSmall, &cfg.mkdirSmall}, {"mkdir-big", *mkdirBig, &cfg.mkdirBig},
		{"mkdir-data", *mkdirData, &cfg.mkdirData}} {
		n, err := measure.ParseSize(s.val)
		if err != nil {
			return nil, fmt.Errorf("-%s: %w", s.flag, err)
		}
		*s.dst = n
	}
	switch {
	case cfg.runs < 1:
		return nil, errors.New("-runs must be at least 1")
	case cfg.layers < 1:
		return nil, errors.New("-layers must be at least 1")
	case cfg.size < int64(cfg.layers)<<20:
		return nil, errors.New("-size must give each layer of the chain at least 1 MiB")
	case cfg.depth < 2:
		return nil, errors.New("-depth must be at least 2")
	case cfg.depthSize < int64(cfg.depth)*stripe:
		return nil, fmt.Errorf("-depth-size must give each of the %d layers at least one %s stripe", cfg.depth, units.FormatSize(stripe))
	case cfg.mkdirData > cfg.mkdirSmall || cfg.mkdirSmall > cfg.mkdirBig:
		return nil, errors.New("need -mkdir-data <= -mkdir-small <= -mkdir-big")
	case cfg.mkdirs < 2:
		return nil, errors.New("-mkdirs must be at least 2")
	case strings.Trim(cfg.cases, "1234") != "" || cfg.cases == "":
		return nil, fmt.Errorf("-cases %q: digits from 1234", cfg.cases)
	}
	return cfg, nil
}

func run(ctx context.Context, cfg *config, w io.Writer) (err error) {
	for _, tool := range []string{cfg.snapfs, "qemu-img", "qemu-io", "cat", "cp", "cmp", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s: %w (make bench builds snapfs; make deps installs qemu-utils and fuse3)", tool, err)
		}
	}
	snapfs, err := filepath.Abs(cfg.snapfs)
	if err != nil {
		return err
	}
	// qemu-img and qemu-io run in other directories: every path handed to
	// them must be absolute.
	if cfg.work, err = filepath.Abs(cfg.work); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.work, 0o755); err != nil {
		return err
	}
	b := &bench{
		ctx:    ctx,
		cfg:    cfg,
		snapfs: snapfs,
		out:    w,
		store:  filepath.Join(cfg.work, "store"),
		mnt:    filepath.Join(cfg.work, "mnt"),
	}
	b.cold = cfg.dropCaches && measure.DropCaches() == nil
	fmt.Fprintf(w, "mountbench: snapfs through a FUSE mount vs qemu-img on the same store, median of %d runs\n", cfg.runs)
	if b.cold {
		fmt.Fprintln(w, "  cold: the page cache is dropped before each run")
	} else {
		fmt.Fprintln(w, "  no cold runs: dropping the page cache needs root (or -drop-caches=false)")
	}
	fmt.Fprintln(w, `  layers cached: both tools read the layer files from the page cache; the mount's cache of the export is evicted first`)
	if !cfg.keep {
		defer func() {
			// Never through a mount that would not go away: that would
			// delete volumes and snapshots one by one.
			if fuseproc.Mounted(b.mnt) {
				return
			}
			if rmErr := os.RemoveAll(cfg.work); err == nil {
				err = rmErr
			}
		}()
	}

	// Every image is made before the mount, so that writing them (qemu-io
	// into the volume heads) competes with nothing that is measured.
	if err := b.prepare(); err != nil {
		return err
	}
	m, err := fuseproc.Start(ctx, exec.Command(snapfs, "mount", "--store", b.store, b.mnt), b.mnt,
		filepath.Join(b.mnt, "volumes"), filepath.Join(cfg.work, "mount.log"))
	if err != nil {
		return err
	}
	defer func() {
		if stopErr := m.Stop(); err == nil {
			err = stopErr
		}
	}()
	b.mount = m
	if cfg.onMounted != nil {
		cfg.onMounted()
	}
	for _, c := range []struct {
		digit string
		run   func() error
	}{{"1", b.catCase}, {"2", b.depthCase}, {"3", b.mkdirCase}, {"4", b.importCase}} {
		if !strings.Contains(cfg.cases, c.digit) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := c.run(); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted: %w", ctx.Err())
			}
			return fmt.Errorf("case %s: %w", c.digit, err)
		}
	}
	b.summary()
	return nil
}
