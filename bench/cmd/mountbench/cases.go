package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// cacheMode is the state of the page cache at the start of a run.
type cacheMode int

const (
	// cold: the whole page cache dropped (root only).
	cold cacheMode = iota
	// layersCached: the layer files of the chain read into the page cache,
	// and the mount's cached pages of the export evicted, so the run
	// measures snapfs (and qemu-img) rather than the disk.
	layersCached
)

func (m cacheMode) String() string {
	if m == cold {
		return "cold"
	}
	return "layers cached"
}

// modes are the cache modes this run can measure.
func (b *bench) modes() []cacheMode {
	if b.cold {
		return []cacheMode{cold, layersCached}
	}
	return []cacheMode{layersCached}
}

// prepareCache puts the page cache in mode before one run: layers are the
// store files that the run reads, exports the mount's files.
func (b *bench) prepareCache(mode cacheMode, layers, exports []string) error {
	if mode == cold {
		return measure.DropCaches()
	}
	for _, e := range exports {
		if err := measure.Evict(e); err != nil {
			return err
		}
	}
	for _, l := range layers {
		if err := measure.Warm(l); err != nil {
			return err
		}
	}
	return nil
}

// side is one command measured in a case: snapfs through the mount, or
// its peer.
type side struct {
	name string
	// cmd makes the command of one run, with the page cache prepared.
	cmd func(run int) (*exec.Cmd, error)
	// mount: the peak RSS to report is the mount's, not the command's.
	mount bool
	// sync: these files are fsynced before the clock stops.
	sync []string
	// syncfs: the store's filesystem is synced before the clock stops
	// (imports, which write more than one file).
	syncfs bool
	// after, if set, runs after each run, untimed: checks and cleanup.
	after func(run int) error
}

// sample is the median of the runs of one side.
type sample struct {
	time  time.Duration
	bytes int64 // guest bytes moved, for throughput
	rssKB int64 // largest peak RSS over the runs
}

func (s sample) throughput() float64 { return measure.MiBps(s.bytes, s.time) }

// measureSides runs every side cfg.runs times, interleaved (a b a b ...)
// so that a change in the machine's load hits every side alike, each run
// after prepare.
func (b *bench) measureSides(sides []side, bytes int64, prepare func() error) ([]sample, error) {
	times := make([][]time.Duration, len(sides))
	samples := make([]sample, len(sides))
	for run := 0; run < b.cfg.runs; run++ {
		for i, s := range sides {
			if err := b.ctx.Err(); err != nil {
				return nil, err
			}
			if err := prepare(); err != nil {
				return nil, err
			}
			cmd, err := s.cmd(run)
			if err != nil {
				return nil, err
			}
			if s.mount {
				if err := measure.ResetPeakRSS(b.mount.PID()); err != nil {
					return nil, err
				}
			}
			r, err := measure.Run(cmd, s.sync...)
			if err != nil {
				return nil, err
			}
			if s.syncfs {
				start := time.Now()
				if err := measure.SyncFS(b.cfg.work); err != nil {
					return nil, err
				}
				r.Time += time.Since(start)
			}
			if s.mount {
				if r.PeakRSSKB, err = measure.PeakRSS(b.mount.PID()); err != nil {
					return nil, err
				}
			}
			times[i] = append(times[i], r.Time)
			samples[i].rssKB = max(samples[i].rssKB, r.PeakRSSKB)
			if s.after != nil {
				if err := s.after(run); err != nil {
					return nil, fmt.Errorf("%s: %w", s.name, err)
				}
			}
		}
	}
	for i := range samples {
		samples[i].time = measure.Median(times[i])
		samples[i].bytes = bytes
	}
	return samples, nil
}

// command makes an exec.Cmd bound to the run's context, so that Ctrl-C
// stops it, with stdout going to out (a file, so that the child writes to
// it directly).
func (b *bench) command(out *os.File, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(b.ctx, name, args...)
	cmd.Stdout = out
	return cmd
}

// compareImages checks with qemu-img compare that a qcow2 chain and an
// image in format fmt hold the same guest data.
func compareImages(qcow2, other, format string) error {
	out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", format, qcow2, other).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img compare %s %s: %v: %s", qcow2, other, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// qemuToNull is qemu-img convert of the chain at top to the null block
// driver, which throws the data away as /dev/null does for cat: qemu-img
// refuses /dev/null itself ("output file is smaller than input file").
func (b *bench) qemuToNull(top string, size int64) *exec.Cmd {
	return b.command(nil, "qemu-img", "convert", "-n", "--target-image-opts", top,
		fmt.Sprintf("driver=null-co,size=%d", size))
}

// catCase is case 1: cat disk.raw of the dense chain against qemu-img
// convert -O raw, to a null sink and to a file.
func (b *bench) catCase() error {
	c, cfg := b.chain, b.cfg
	export := c.export(b.mnt)
	b.header(fmt.Sprintf("1. cat disk.raw of a dense chain, %d layers, %s", cfg.layers, units.FormatSize(cfg.size)))
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer devNull.Close()
	for _, mode := range b.modes() {
		prepare := func() error { return b.prepareCache(mode, c.layers, []string{export}) }
		sides := []side{
			{name: fmt.Sprintf("snapfs: cat disk.raw > /dev/null, %s", mode), mount: true,
				cmd: func(int) (*exec.Cmd, error) { return b.command(devNull, "cat", export), nil }},
			{name: fmt.Sprintf("qemu-img convert -O raw > null, %s", mode),
				cmd: func(int) (*exec.Cmd, error) { return b.qemuToNull(c.top, cfg.size), nil }},
		}
		s, err := b.measureSides(sides, cfg.size, prepare)
		if err != nil {
			return err
		}
		b.pair(sides, s, fmt.Sprintf("1. cat disk.raw > /dev/null vs qemu-img convert -O raw (null sink), %s", mode), 1)
	}

	// To a file on the same disk, as a backup would: the first mode only.
	mode := b.modes()[0]
	prepare := func() error { return b.prepareCache(mode, c.layers, []string{export}) }
	ours := filepath.Join(cfg.work, "out-snapfs.raw")
	peer := filepath.Join(cfg.work, "out-qemu.raw")
	defer os.Remove(ours)
	defer os.Remove(peer)
	var out *os.File
	defer func() {
		if out != nil {
			out.Close()
		}
	}()
	fileSides := []side{
		{name: fmt.Sprintf("snapfs: cat disk.raw > file, %s", mode), mount: true, sync: []string{ours},
			cmd: func(int) (*exec.Cmd, error) {
				os.Remove(ours)
				f, err := os.Create(ours)
				out = f
				return b.command(f, "cat", export), err
			},
			after: func(run int) error {
				out.Close()
				out = nil
				var err error
				if run == 0 && cfg.verify {
					err = compareImages(c.top, ours, "raw")
				}
				os.Remove(ours)
				return err
			}},
		{name: fmt.Sprintf("qemu-img convert -O raw file, %s", mode), sync: []string{peer},
			cmd: func(int) (*exec.Cmd, error) {
				os.Remove(peer)
				return b.command(nil, "qemu-img", "convert", "-O", "raw", c.top, peer), nil
			},
			after: func(int) error { return os.Remove(peer) }},
	}
	s, err := b.measureSides(fileSides, cfg.size, prepare)
	if err != nil {
		return err
	}
	b.pair(fileSides, s, fmt.Sprintf("1. cat disk.raw > file vs qemu-img convert -O raw file, %s", mode), 1)
	return nil
}

// depthCase is case 2: cat disk.raw of a chain 1 deep and of one N deep
// holding the same data, and qemu-img on the same chains for reference.
func (b *bench) depthCase() error {
	cfg := b.cfg
	shallow, deep := b.shallow, b.deep
	bytes := cfg.depthSize / stripe * stripe
	b.header(fmt.Sprintf("2. read disk.raw of a chain 1 deep and %d deep, %s of the same data", cfg.depth, units.FormatSize(bytes)))
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer devNull.Close()
	layers := append(slices.Clone(shallow.layers), deep.layers...)
	exports := []string{shallow.export(b.mnt), deep.export(b.mnt)}
	for _, mode := range b.modes() {
		prepare := func() error { return b.prepareCache(mode, layers, exports) }
		sides := []side{
			{name: fmt.Sprintf("snapfs, depth 1, %s", mode), mount: true,
				cmd: func(int) (*exec.Cmd, error) { return b.command(devNull, "cat", exports[0]), nil }},
			{name: fmt.Sprintf("snapfs, depth %d, %s", cfg.depth, mode), mount: true,
				cmd: func(int) (*exec.Cmd, error) { return b.command(devNull, "cat", exports[1]), nil }},
			{name: fmt.Sprintf("qemu-img, depth 1, %s", mode),
				cmd: func(int) (*exec.Cmd, error) { return b.qemuToNull(shallow.top, bytes), nil }},
			{name: fmt.Sprintf("qemu-img, depth %d, %s", cfg.depth, mode),
				cmd: func(int) (*exec.Cmd, error) { return b.qemuToNull(deep.top, bytes), nil }},
		}
		s, err := b.measureSides(sides, bytes, prepare)
		if err != nil {
			return err
		}
		for i, x := range s {
			b.row(sides[i].name, x)
		}
		ratio := s[1].throughput() / s[0].throughput()
		ok := ratio >= 0.9
		fmt.Fprintf(b.out, "  %-48s %9.2f   (qemu-img: %.2f; target >= 0.90: %s)\n",
			fmt.Sprintf("throughput depth %d / depth 1", cfg.depth), ratio, s[3].throughput()/s[2].throughput(), measure.Verdict(ok))
		b.verdicts = append(b.verdicts, fmt.Sprintf("2. read depth %d / depth 1, %s: %.2f (target >= 0.90): %s", cfg.depth, mode, ratio, measure.Verdict(ok)))
	}
	if cfg.verify {
		for i, c := range []*snapChain{shallow, deep} {
			if err := compareImages(c.top, exports[i], "raw"); err != nil {
				return err
			}
		}
	}
	return nil
}

// mkdirCase is case 3: the latency of mkdir volumes/V/snapshots/S on a
// small and a big volume, taken in turns.
func (b *bench) mkdirCase() error {
	cfg := b.cfg
	b.title(fmt.Sprintf("3. mkdir snapshot latency, %d per volume, taken in turns, %s of data in each volume",
		cfg.mkdirs, units.FormatSize(cfg.mkdirData)))
	vols := []struct {
		name string
		size int64
	}{{mkdirSmallVolume, cfg.mkdirSmall}, {mkdirBigVolume, cfg.mkdirBig}}
	times := make([][]time.Duration, len(vols))
	for i := 0; i < cfg.mkdirs; i++ {
		for k := range vols {
			// Every other round the other volume goes first, so neither
			// always follows the other's fsyncs.
			v := (k + i) % len(vols)
			if err := b.ctx.Err(); err != nil {
				return err
			}
			dir := filepath.Join(b.mnt, "volumes", vols[v].name, "snapshots", fmt.Sprintf("m%d", i))
			start := time.Now()
			err := os.Mkdir(dir, 0o755)
			times[v] = append(times[v], time.Since(start))
			if err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(b.out, "  %-48s %9s %9s %9s %9s\n", "volume", "p50", "p90", "min", "max")
	for v, vol := range vols {
		// The snapshots must be there, seen by the store's own CLI.
		out, err := b.sf("snapshot", "list", "--json", vol.name)
		if err != nil {
			return err
		}
		if n := strings.Count(string(out), `"name"`); n != cfg.mkdirs {
			return fmt.Errorf("volume %s has %d snapshots after %d mkdirs", vol.name, n, cfg.mkdirs)
		}
		fmt.Fprintf(b.out, "  %-48s %9s %9s %9s %9s\n", fmt.Sprintf("%s, %s virtual", vol.name, units.FormatSize(vol.size)),
			measure.Millis(measure.Percentile(times[v], 50)), measure.Millis(measure.Percentile(times[v], 90)), measure.Millis(slices.Min(times[v])), measure.Millis(slices.Max(times[v])))
	}
	p50s := []time.Duration{measure.Percentile(times[0], 50), measure.Percentile(times[1], 50)}
	ratio50 := p50s[1].Seconds() / p50s[0].Seconds()
	ratio90 := measure.Percentile(times[1], 90).Seconds() / measure.Percentile(times[0], 90).Seconds()
	// Within noise: p50s within 25% of each other, or less than 1 ms apart
	// (fsync latency alone varies by more than that).
	diff := max(p50s[1]-p50s[0], p50s[0]-p50s[1])
	equal := (ratio50 >= 0.8 && ratio50 <= 1.25) || diff < time.Millisecond
	fast := p50s[0] < 20*time.Millisecond && p50s[1] < 20*time.Millisecond
	fmt.Fprintf(b.out, "  %-48s %9.2f %9.2f   (target: equal within noise: %s; p50 < 20 ms: %s)\n",
		fmt.Sprintf("ratio %s / %s", units.FormatSize(cfg.mkdirBig), units.FormatSize(cfg.mkdirSmall)), ratio50, ratio90, measure.Verdict(equal), measure.Verdict(fast))
	b.verdicts = append(b.verdicts, fmt.Sprintf("3. mkdir p50 %s on %s, %s on %s, ratio %.2f (target: equal within noise, p50 < 20 ms): %s",
		measure.Millis(p50s[0]), units.FormatSize(cfg.mkdirSmall), measure.Millis(p50s[1]), units.FormatSize(cfg.mkdirBig), ratio50, measure.Verdict(equal && fast)))
	return nil
}

// importCase is case 4: cp of a dense qcow2 into import/ against qemu-img
// convert -O qcow2 of the same file into the same filesystem, and snapfs
// volume import (the same store import without FUSE) for reference.
func (b *bench) importCase() error {
	cfg := b.cfg
	src := b.importSource
	mode := b.modes()[0]
	b.header(fmt.Sprintf("4. import a dense qcow2 of %s, %s; times include syncfs of the store's filesystem", units.FormatSize(cfg.size), mode))
	converted := filepath.Join(cfg.work, "converted.qcow2")
	defer os.Remove(converted)
	plain := filepath.Join(cfg.work, "plain-cp.qcow2")
	defer os.Remove(plain)
	prepare := func() error { return b.prepareCache(mode, []string{src}, nil) }
	// imported checks volume name after an import (its data, on the
	// first run) and deletes it.
	imported := func(name string, run int) error {
		if _, err := os.Stat(filepath.Join(b.mnt, "volumes", name, "info.json")); err != nil {
			return fmt.Errorf("no volumes/%s after the import: %w", name, err)
		}
		if run == 0 && cfg.verify {
			head, err := b.headPath(name)
			if err != nil {
				return err
			}
			if err := compareImages(src, head, "qcow2"); err != nil {
				return err
			}
		}
		_, err := b.sf("volume", "delete", name)
		return err
	}
	sides := []side{
		{name: "snapfs: cp into import/", mount: true, syncfs: true,
			cmd: func(run int) (*exec.Cmd, error) {
				return b.command(nil, "cp", src, filepath.Join(b.mnt, "import", fmt.Sprintf("%scp%d", importPrefix, run))), nil
			},
			after: func(run int) error { return imported(fmt.Sprintf("%scp%d", importPrefix, run), run) }},
		{name: "qemu-img convert -O qcow2", syncfs: true,
			cmd: func(int) (*exec.Cmd, error) {
				os.Remove(converted)
				return b.command(nil, "qemu-img", "convert", "-O", "qcow2", src, converted), nil
			},
			after: func(int) error { return os.Remove(converted) }},
		{name: "snapfs volume import (no FUSE)", syncfs: true,
			cmd: func(run int) (*exec.Cmd, error) {
				return b.command(nil, b.snapfs, "volume", "import", "--store", b.store, src, fmt.Sprintf("%scli%d", importPrefix, run)), nil
			},
			after: func(run int) error { return imported(fmt.Sprintf("%scli%d", importPrefix, run), run) }},
		// cp itself, to a plain file: the ceiling of cp into import/.
		// cp copies one buffer at a time, read then write, where
		// qemu-img convert keeps several requests in flight.
		{name: "cp to a plain file (no snapfs)", syncfs: true,
			cmd: func(int) (*exec.Cmd, error) {
				os.Remove(plain)
				return b.command(nil, "cp", src, plain), nil
			},
			after: func(int) error { return os.Remove(plain) }},
	}
	s, err := b.measureSides(sides, cfg.size, prepare)
	if err != nil {
		return err
	}
	b.pair(sides[:2], s[:2], "4. cp into import/ vs qemu-img convert -O qcow2", 1)
	b.row(sides[2].name, s[2])
	fmt.Fprintf(b.out, "  %-48s %9.2f   (snapfs volume import / qemu-img)\n", "throughput ratio", s[2].throughput()/s[1].throughput())
	b.row(sides[3].name, s[3])
	fmt.Fprintf(b.out, "  %-48s %9.2f   (cp into import/ / cp to a plain file)\n", "throughput ratio", s[0].throughput()/s[3].throughput())
	fmt.Fprintf(b.out, "  %-48s %9.2f   (cp to a plain file / qemu-img)\n", "throughput ratio", s[3].throughput()/s[1].throughput())
	return nil
}
