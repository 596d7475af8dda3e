// Command qcowbench measures snapfs against qemu-img on the same images in
// the same run, and prints times, throughput, peak memory and the ratio of
// the two (issue 2's benchmarks):
//
//	a. flatten a dense chain of 8 qcow2 layers to raw
//	b. the same to qcow2
//	c. the same to zstd-compressed qcow2
//	d. raw export of a huge sparse image (1 TiB virtual, 1 GiB of data)
//	   against one of 2 GiB virtual holding the same data: the time must
//	   follow the data, not the virtual size
//
// It builds its images with qemu-img and qemu-io under -work (reused while
// their parameters stay the same), runs each command -runs times, and
// reports the median. Before every run it drops the page cache when it may
// (root), so both tools read cold; otherwise it reads every input once so
// both read warm. The time of a run includes flushing its output to disk
// (fsync): snapfs convert flushes before it renames, qemu-img does not by
// default, so the harness flushes after it to compare like with like.
//
// Sizes take K, M, G, T suffixes (powers of 1024). For a quick run while
// developing:
//
//	qcowbench -size 256M -sparse-virtual 64G -sparse-data 128M -runs 1
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// config is what the flags say.
type config struct {
	snapfs string // the snapfs binary
	work   string // where images and outputs go
	runs   int
	cases  string // which cases to run: letters from "abcd"
	// dense chain (cases a-c)
	size   int64
	layers int
	// sparse images (case d)
	sparseVirtual, sparseSmall, sparseData int64
	// dropCaches is tried before every run; warm caches are used when it
	// fails or is off.
	dropCaches bool
	verify     bool // check snapfs's output with qemu-img compare
	keep       bool // keep the images for the next run
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "qcowbench:", err)
		os.Exit(2)
	}
	if err := run(cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "qcowbench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet("qcowbench", flag.ContinueOnError)
	fs.StringVar(&cfg.snapfs, "snapfs", "bin/snapfs", "the snapfs binary to measure")
	fs.StringVar(&cfg.work, "work", ".bench", "work directory for images and outputs")
	fs.IntVar(&cfg.runs, "runs", 3, "runs of each command; the median is reported")
	fs.StringVar(&cfg.cases, "cases", "abcd", "cases to run (a: chain to raw, b: to qcow2, c: to zstd qcow2, d: sparse raw export)")
	size := fs.String("size", "2G", "virtual size of the dense chain")
	fs.IntVar(&cfg.layers, "layers", 8, "layers of the dense chain")
	sparseVirtual := fs.String("sparse-virtual", "1T", "virtual size of the big sparse image")
	sparseSmall := fs.String("sparse-small", "2G", "virtual size of the small image it is compared with")
	sparseData := fs.String("sparse-data", "1G", "data in each sparse image")
	fs.BoolVar(&cfg.dropCaches, "drop-caches", true, "drop the page cache before each run (needs root; else caches are warmed)")
	fs.BoolVar(&cfg.verify, "verify", true, "check each snapfs output against its source with qemu-img compare")
	fs.BoolVar(&cfg.keep, "keep", true, "keep the generated images in -work for the next run")
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
	}{{"size", *size, &cfg.size}, {"sparse-virtual", *sparseVirtual, &cfg.sparseVirtual},
		{"sparse-small", *sparseSmall, &cfg.sparseSmall}, {"sparse-data", *sparseData, &cfg.sparseData}} {
		n, err := parseSize(s.val)
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
		return nil, errors.New("-size must give each layer at least 1 MiB")
	case cfg.sparseData > cfg.sparseSmall || cfg.sparseSmall > cfg.sparseVirtual:
		return nil, errors.New("need -sparse-data <= -sparse-small <= -sparse-virtual")
	case strings.Trim(cfg.cases, "abcd") != "" || cfg.cases == "":
		return nil, fmt.Errorf("-cases %q: letters from abcd", cfg.cases)
	}
	return cfg, nil
}

// parseSize parses "2G", "256M", "1T", "4096" (bytes).
var parseSize = measure.ParseSize

func run(cfg *config, w io.Writer) error {
	for _, tool := range []string{cfg.snapfs, "qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s: %w (make bench builds snapfs; make deps installs qemu-utils)", tool, err)
		}
	}
	snapfs, err := filepath.Abs(cfg.snapfs)
	if err != nil {
		return err
	}
	// qemu-img and qemu-io run inside the image directories: every path
	// handed to them must be absolute.
	if cfg.work, err = filepath.Abs(cfg.work); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.work, 0o755); err != nil {
		return err
	}
	b := &bench{cfg: cfg, snapfs: snapfs, out: w}
	b.cold = cfg.dropCaches && measure.DropCaches() == nil
	cache := "page cache dropped before each run"
	if !b.cold {
		cache = "page cache warmed before each run (dropping it needs root)"
	}
	fmt.Fprintf(w, "qcowbench: snapfs vs qemu-img, median of %d runs, %s; times include fsync of the output\n", cfg.runs, cache)

	if strings.ContainsAny(cfg.cases, "abc") {
		top, err := b.denseChain()
		if err != nil {
			return err
		}
		b.header(fmt.Sprintf("dense chain: %d qcow2 layers, %s virtual, flattened", cfg.layers, units.FormatSize(cfg.size)))
		for _, c := range []struct {
			letter, name    string
			snapfs, qemuImg []string
			out             string
		}{
			{"a", "to raw", []string{"convert", "-O", "raw"}, []string{"convert", "-O", "raw"}, "out.raw"},
			{"b", "to qcow2", []string{"convert", "-O", "qcow2"}, []string{"convert", "-O", "qcow2"}, "out.qcow2"},
			{"c", "to qcow2 zstd", []string{"convert", "-O", "qcow2", "-c", "zstd"},
				[]string{"convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd"}, "out-zstd.qcow2"},
		} {
			if !strings.Contains(cfg.cases, c.letter) {
				continue
			}
			out := filepath.Join(cfg.work, c.out)
			s, err := b.measure(command{snapfs, append(slices.Clone(c.snapfs), top, out)}, []string{top}, out, cfg.size)
			if err != nil {
				return err
			}
			q, err := b.measure(command{"qemu-img", append(slices.Clone(c.qemuImg), top, out)}, []string{top}, out, cfg.size)
			if err != nil {
				return err
			}
			b.pair(c.letter+". "+c.name, s, q)
		}
	}
	if strings.Contains(cfg.cases, "d") {
		if err := b.sparseCase(); err != nil {
			return err
		}
	}
	if !cfg.keep {
		return os.RemoveAll(cfg.work)
	}
	return nil
}
