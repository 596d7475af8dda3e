// Package measure holds what the benchmark programs under bench/cmd share
// to measure a tool against its peer fairly: the wall time and peak memory
// of a child process, page-cache control (drop it, evict one file, warm a
// file), and medians and percentiles.
//
// # Fairness
//
// A comparison is only meaningful when both sides start from the same page
// cache. The benchmarks drop the whole cache before each cold run when they
// may (DropCaches needs root), and otherwise read every input once (Warm)
// so that both sides read warm; they say which in their output. The time of
// a run includes flushing its output to disk (Run's sync paths), because
// tools differ in whether they flush before they exit.
package measure

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Result is one run of a child process.
type Result struct {
	Time      time.Duration // wall time, fsync of the outputs included
	PeakRSSKB int64         // peak resident set of the child, in KiB
	CPU       time.Duration // user and system CPU time of the child
}

// Run runs cmd to completion and returns its wall time, peak RSS and CPU
// time (from the child's rusage). Each path in sync is fsynced before the clock stops.
// Unless cmd.Stderr is set, the child's stderr is kept for the error.
func Run(cmd *exec.Cmd, sync ...string) (Result, error) {
	var stderr bytes.Buffer
	if cmd.Stderr == nil {
		cmd.Stderr = &stderr
	}
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return Result{}, fmt.Errorf("%s: %w: %s", CommandLine(cmd), err, strings.TrimSpace(stderr.String()))
	}
	for _, path := range sync {
		if err := Fsync(path); err != nil {
			return Result{}, err
		}
	}
	r := Result{Time: time.Since(start)}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.PeakRSSKB = ru.Maxrss // KiB on Linux
		r.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return r, nil
}

// CommandLine renders cmd for messages: the program's base name and its
// arguments.
func CommandLine(cmd *exec.Cmd) string {
	name := cmd.Path
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	return strings.Join(append([]string{name}, cmd.Args[1:]...), " ")
}

// Fsync flushes the file at path to disk.
func Fsync(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// DropCaches writes dirty pages out and drops the page cache, so that the
// next reader reads from the disk. It needs root.
func DropCaches() error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o644)
}

// Warm reads the file at path into the page cache, skipping holes so that a
// huge sparse file takes the time of its data.
func Warm(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var off int64
	for {
		data, err := f.Seek(off, seekData)
		if err != nil {
			return nil // ENXIO: no more data
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return err
		}
		for off = data; off < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-off)], off)
			off += int64(n)
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}
}

// Whence values of lseek(2) that package os does not name.
const (
	seekData = 3
	seekHole = 4
)

// Median returns the middle of times (the upper middle of an even count),
// or 0 for no values.
func Median(times []time.Duration) time.Duration {
	if len(times) == 0 {
		return 0
	}
	sorted := slices.Clone(times)
	slices.Sort(sorted)
	return sorted[len(sorted)/2]
}

// Percentile returns the p-th percentile of times (0 < p <= 100) by the
// nearest-rank method: the smallest value that at least p percent of the
// values are at or below. It returns 0 for no values.
func Percentile(times []time.Duration, p float64) time.Duration {
	if len(times) == 0 {
		return 0
	}
	sorted := slices.Clone(times)
	slices.Sort(sorted)
	// The epsilon keeps 90% of 10 values at rank 9, not 10.
	rank := int(math.Ceil(p/100*float64(len(sorted)) - 1e-9))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

// ParseSize parses a size as qemu-img writes one: "4096" (bytes), "64K",
// "256M", "2G", "1T" (powers of 1024, either case).
func ParseSize(s string) (int64, error) {
	orig := s
	mult := int64(1)
	if n := len(s); n > 0 {
		if i := strings.IndexByte("KMGT", s[n-1]&^0x20); i >= 0 {
			mult = 1 << (10 * (i + 1))
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q (want a positive number with an optional K, M, G or T)", orig)
	}
	return v * mult, nil
}

// MiBps is the throughput of moving bytes in d, in MiB/s.
func MiBps(bytes int64, d time.Duration) float64 {
	return float64(bytes) / (1 << 20) / d.Seconds()
}

// Verdict is how a report says whether a target was met.
func Verdict(met bool) string {
	if met {
		return "met"
	}
	return "MISSED"
}

// Millis renders a latency in milliseconds ("5.2 ms").
func Millis(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}
