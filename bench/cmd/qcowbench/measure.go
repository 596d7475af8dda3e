package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// bench holds the state of one benchmark run.
type bench struct {
	cfg    *config
	snapfs string // absolute path of the binary
	out    io.Writer
	cold   bool // the page cache is dropped before each run
	// inputs of the case being measured, for warming when not cold
	inputs []string
}

// command is a program and its arguments.
type command struct {
	path string
	args []string
}

func (c command) String() string { return filepath.Base(c.path) + " " + strings.Join(c.args, " ") }

// sample is the median of the runs of one command.
type sample struct {
	cmd      command
	time     time.Duration // median wall time, fsync of the output included
	rssKiB   int64         // largest peak RSS over the runs
	bytes    int64         // guest bytes processed, for throughput
	outSize  int64         // apparent size of the output
	outBlock int64         // bytes the output takes on disk
}

// throughput in MiB/s.
func (s sample) throughput() float64 {
	return measure.MiBps(s.bytes, s.time)
}

// measure runs cmd cfg.runs times, each on a cold (or equally warm) cache,
// with out removed before and after each run. It verifies snapfs's output
// against inputs[0] once, when asked to.
func (b *bench) measure(cmd command, inputs []string, out string, work int64) (sample, error) {
	s := sample{cmd: cmd, bytes: work}
	var times []time.Duration
	for i := 0; i < b.cfg.runs; i++ {
		os.Remove(out)
		if err := b.prepareCache(inputs); err != nil {
			return s, err
		}
		r, err := measure.Run(exec.Command(cmd.path, cmd.args...), out)
		if err != nil {
			return s, err
		}
		times = append(times, r.Time)
		s.rssKiB = max(s.rssKiB, r.PeakRSSKB)
		var st syscall.Stat_t
		if err := syscall.Stat(out, &st); err != nil {
			return s, fmt.Errorf("%s made no output: %w", cmd, err)
		}
		s.outSize, s.outBlock = st.Size, st.Blocks*512
		if i == 0 && b.cfg.verify && cmd.path == b.snapfs {
			if err := compare(inputs[0], out); err != nil {
				return s, fmt.Errorf("%s: wrong output: %w", cmd, err)
			}
		}
	}
	os.Remove(out)
	s.time = measure.Median(times)
	return s, nil
}

// prepareCache makes the page cache the same for every run: empty when the
// harness may drop it, else holding every input.
func (b *bench) prepareCache(inputs []string) error {
	if b.cold {
		return measure.DropCaches()
	}
	for _, in := range inputs {
		if err := measure.Warm(in); err != nil {
			return err
		}
	}
	return nil
}

// compare runs qemu-img compare on two images.
func compare(a, b string) error {
	out, err := exec.Command("qemu-img", "compare", a, b).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img compare %s %s: %v: %s", a, b, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// tableRow lays out one row of a results table.
const tableRow = "  %-26s %-9s %9s %8s %10s %10s %10s\n"

// header prints the title of a group of cases and the table head.
func (b *bench) header(title string) {
	fmt.Fprintf(b.out, "\n%s\n", title)
	fmt.Fprintf(b.out, tableRow, "case", "tool", "time", "MiB/s", "peak RSS", "output", "on disk")
}

// pair prints snapfs's and qemu-img's samples of one case, then their ratio
// (below 1 for time and RSS, above 1 for throughput, is snapfs ahead).
func (b *bench) pair(name string, s, q sample) {
	for _, x := range []struct {
		name, tool string
		s          sample
	}{{name, "snapfs", s}, {"", "qemu-img", q}} {
		fmt.Fprintf(b.out, tableRow, x.name, x.tool, fmt.Sprintf("%.2f s", x.s.time.Seconds()),
			fmt.Sprintf("%.0f", x.s.throughput()), units.FormatSize(x.s.rssKiB<<10), units.FormatSize(x.s.outSize), units.FormatSize(x.s.outBlock))
	}
	ratio := s.time.Seconds() / q.time.Seconds()
	verdict := "snapfs faster"
	if ratio > 1 {
		verdict = "snapfs slower"
	}
	fmt.Fprintf(b.out, strings.TrimSuffix(tableRow, "\n")+"  (snapfs/qemu-img: %s)\n", "", "ratio",
		fmt.Sprintf("%.2f", ratio), fmt.Sprintf("%.2f", s.throughput()/q.throughput()),
		fmt.Sprintf("%.2f", float64(s.rssKiB)/float64(max(q.rssKiB, 1))), "",
		fmt.Sprintf("%.2f", float64(s.outBlock)/float64(max(q.outBlock, 1))), verdict)
}
