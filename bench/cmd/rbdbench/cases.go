package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"snapfs/bench/internal/fuseproc"
	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// side is one way of reading an image, measured in a case.
type side struct {
	name string
	// read makes the command of one run and returns the FUSE server whose
	// peak RSS to report (nil: the command's own) and the function that
	// ends the run, untimed (an unmount).
	read func() (cmd *exec.Cmd, server *fuseproc.Proc, done func() error, err error)
}

// sample is the median of the runs of one side.
type sample struct {
	time  time.Duration
	rssKB int64
	bytes int64
	// cpu is the CPU time of the client side: the command, plus the FUSE
	// server for a mount; osdCPU the OSD's during the run. On a machine
	// whose few cores the OSD shares, they say what bounds the times.
	cpu, osdCPU time.Duration
}

func (s sample) throughput() float64 { return measure.MiBps(s.bytes, s.time) }

// measureSides runs every side cfg.runs times, the sides in turn within a
// run so that noise spreads over all of them, and returns their medians.
func (b *bench) measureSides(size int64, sides []side) ([]sample, error) {
	times := make([][]time.Duration, len(sides))
	rss := make([][]time.Duration, len(sides)) // KiB, as durations for Median
	cpu := make([][]time.Duration, len(sides))
	osdCPU := make([][]time.Duration, len(sides))
	osd, err := b.c.osdPID()
	if err != nil {
		return nil, err
	}
	for range b.cfg.runs {
		for i, s := range sides {
			if b.cold {
				if err := measure.DropCaches(); err != nil {
					return nil, err
				}
			}
			cmd, server, done, err := s.read()
			if err != nil {
				return nil, err
			}
			if server != nil {
				measure.ResetPeakRSS(server.PID())
			}
			cmd.Stdout = nil // /dev/null
			// CPU times are read before and after: the server's
			// and the OSD's span more than the run.
			var serverStart, osdStart, serverUsed, osdUsed time.Duration
			if server != nil {
				serverStart, err = measure.ProcessCPU(server.PID())
			}
			if err == nil {
				osdStart, err = measure.ProcessCPU(osd)
			}
			if err != nil {
				done()
				return nil, err
			}
			r, err := measure.Run(cmd)
			if server != nil && err == nil {
				r.PeakRSSKB, err = measure.PeakRSS(server.PID())
				if err == nil {
					serverUsed, err = cpuSince(server.PID(), serverStart)
				}
			}
			if err == nil {
				osdUsed, err = cpuSince(osd, osdStart)
			}
			if doneErr := done(); err == nil {
				err = doneErr
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.name, err)
			}
			times[i] = append(times[i], r.Time)
			rss[i] = append(rss[i], time.Duration(r.PeakRSSKB))
			cpu[i] = append(cpu[i], r.CPU+serverUsed)
			osdCPU[i] = append(osdCPU[i], osdUsed)
		}
	}
	out := make([]sample, len(sides))
	for i := range sides {
		out[i] = sample{time: measure.Median(times[i]), rssKB: int64(measure.Median(rss[i])), bytes: size,
			cpu: measure.Median(cpu[i]), osdCPU: measure.Median(osdCPU[i])}
	}
	return out, nil
}

// cpuSince returns the CPU time process pid has used since it had used
// start.
func cpuSince(pid int, start time.Duration) (time.Duration, error) {
	now, err := measure.ProcessCPU(pid)
	return now - start, err
}

// mountSnapfs mounts the pool with snapfs, its root showing the pool.
func (b *bench) mountSnapfs(ready string) (*fuseproc.Proc, error) {
	dir := filepath.Join(b.cfg.work, "mnt")
	staging := filepath.Join(b.cfg.work, "staging")
	if err := os.MkdirAll(staging, 0o755); err != nil {
		return nil, err
	}
	cmd := exec.Command(b.snapfs, "mount", "--ceph-conf", b.c.conf, "--pool", "rbd", dir)
	cmd.Env = append(os.Environ(), "TMPDIR="+staging)
	return fuseproc.Start(b.ctx, cmd, dir, filepath.Join(dir, ready), filepath.Join(b.cfg.work, "snapfs.log"))
}

// catSnapfs is the side that reads path (below the mount) with cat.
func (b *bench) catSnapfs(name, path string) side {
	return side{name: name, read: func() (*exec.Cmd, *fuseproc.Proc, func() error, error) {
		m, err := b.mountSnapfs(path)
		if err != nil {
			return nil, nil, nil, err
		}
		return exec.CommandContext(b.ctx, "cat", filepath.Join(m.Dir(), path)), m, m.Stop, nil
	}}
}

// throughput is case 1.
func (b *bench) throughput() error {
	size := b.cfg.size
	fmt.Fprintf(b.out, "\n1. reading a %s image full of data: snapfs disk.raw vs rbd export vs rbd-fuse\n", units.FormatSize(size))
	want, err := b.c.importData("rbd/big", size, 1)
	if err != nil {
		return err
	}
	if _, err := b.c.run("rbd", "snap", "create", "--no-progress", "rbd/big@s"); err != nil {
		return err
	}
	const raw = "volumes/big/snapshots/s/disk.raw"
	if b.cfg.verify {
		if err := b.verify(raw, want, "rbd/big@s"); err != nil {
			return err
		}
	}
	fuseDir := filepath.Join(b.cfg.work, "rbd-fuse")
	sides := []side{
		b.catSnapfs("cat "+raw+" (snapfs mount)", raw),
		{name: "rbd export big@s - >/dev/null", read: func() (*exec.Cmd, *fuseproc.Proc, func() error, error) {
			return b.c.command("rbd", "export", "--no-progress", "rbd/big@s", "-"), nil, func() error { return nil }, nil
		}},
		{name: "cat big (rbd-fuse mount)", read: func() (*exec.Cmd, *fuseproc.Proc, func() error, error) {
			// rbd-fuse shows heads only: big's head is big@s.
			m, err := fuseproc.Start(b.ctx, exec.Command("rbd-fuse", "-c", b.c.conf, "-p", "rbd", fuseDir, "-f"), fuseDir, filepath.Join(fuseDir, "big"), filepath.Join(b.cfg.work, "rbd-fuse.log"))
			if err != nil {
				return nil, nil, nil, err
			}
			return exec.CommandContext(b.ctx, "cat", filepath.Join(fuseDir, "big")), m, m.Stop, nil
		}},
	}
	s, err := b.measureSides(size, sides)
	if err != nil {
		return err
	}
	b.header()
	for i, sd := range sides {
		b.row(sd.name, s[i])
	}
	b.ratio("snapfs / rbd export, throughput", s[0].throughput()/s[1].throughput(), 1.0, ">=")
	b.ratio("snapfs / rbd-fuse, throughput", s[0].throughput()/s[2].throughput(), 2.0, ">=")
	return nil
}

// verify checks that disk.raw at path reads want, the SHA-256 of the data
// written, and what rbd export of spec gives.
func (b *bench) verify(path string, want []byte, spec string) error {
	m, err := b.mountSnapfs(path)
	if err != nil {
		return err
	}
	got, err := fileHash(filepath.Join(m.Dir(), path))
	if stopErr := m.Stop(); err == nil {
		err = stopErr
	}
	if err != nil {
		return err
	}
	oracle, err := b.c.exportHash(spec)
	if err != nil {
		return err
	}
	if want == nil {
		want = oracle
	}
	if !bytes.Equal(got, want) || !bytes.Equal(oracle, want) {
		return fmt.Errorf("verify: %s reads sha256 %x, rbd export %s %x, written %x", path, got, spec, oracle, want)
	}
	fmt.Fprintf(b.out, "  verified: %s reads exactly what rbd export %s gives\n", path, spec)
	return nil
}

// chain is case 2: a clone chain cfg.depth deep, each clone owning every
// depth-th object (it wrote 4 KiB into each, and RBD copied the rest of
// the object up from the parent), against the same content in an image of
// its own.
func (b *bench) chain() error {
	size, depth := b.cfg.chainSize, b.cfg.depth
	fmt.Fprintf(b.out, "\n2. reading a %s snapshot at the end of a clone chain %d deep vs the same content in a flat image\n", units.FormatSize(size), depth)
	if _, err := b.c.importData("rbd/chain0", size, 2); err != nil {
		return err
	}
	// Clone v2: no protection needed.
	if _, err := b.c.run("ceph", "osd", "set-require-min-compat-client", "mimic"); err != nil {
		return err
	}
	if _, err := b.c.run("rbd", "snap", "create", "--no-progress", "rbd/chain0@s"); err != nil {
		return err
	}
	objects := size / objectSize
	for i := 1; i <= depth; i++ {
		img := "chain" + strconv.Itoa(i)
		if _, err := b.c.run("rbd", "clone", "rbd/chain"+strconv.Itoa(i-1)+"@s", "rbd/"+img); err != nil {
			return err
		}
		args := []string{"-f", "raw"}
		for obj := int64(i - 1); obj < objects; obj += int64(depth) {
			args = append(args, "-c", fmt.Sprintf("write -P %d %d 4k", 0x10+i, obj*objectSize+int64(i)*4096))
		}
		args = append(args, "rbd:rbd/"+img+":conf="+b.c.conf)
		if out, err := exec.CommandContext(b.ctx, "qemu-io", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("qemu-io on rbd/%s: %v: %s", img, err, out)
		}
		if _, err := b.c.run("rbd", "snap", "create", "--no-progress", "rbd/"+img+"@s"); err != nil {
			return err
		}
	}
	top := "chain" + strconv.Itoa(depth)
	if err := b.c.copyFlat("rbd/"+top+"@s", "rbd/flat"); err != nil {
		return err
	}
	if _, err := b.c.run("rbd", "snap", "create", "--no-progress", "rbd/flat@s"); err != nil {
		return err
	}
	deep, flat := "volumes/"+top+"/snapshots/s/disk.raw", "volumes/flat/snapshots/s/disk.raw"
	if b.cfg.verify {
		want, err := b.c.exportHash("rbd/flat@s")
		if err != nil {
			return err
		}
		if err := b.verify(deep, want, "rbd/"+top+"@s"); err != nil {
			return err
		}
		if err := b.verify(flat, want, "rbd/flat@s"); err != nil {
			return err
		}
	}
	sides := []side{
		b.catSnapfs(fmt.Sprintf("cat disk.raw, depth %d (snapfs)", depth), deep),
		b.catSnapfs("cat disk.raw, flat (snapfs)", flat),
	}
	s, err := b.measureSides(size, sides)
	if err != nil {
		return err
	}
	b.header()
	for i, sd := range sides {
		b.row(sd.name, s[i])
	}
	b.ratio(fmt.Sprintf("depth %d / flat, time", depth), s[0].time.Seconds()/s[1].time.Seconds(), 1.10, "<=")
	return nil
}

// mkdirLatency is case 3: snapshots taken by mkdir through the mount.
func (b *bench) mkdirLatency() error {
	fmt.Fprintf(b.out, "\n3. mkdir volumes/big/snapshots/S (rbd snap create) through the mount, %d times\n", b.cfg.mkdirs)
	m, err := b.mountSnapfs("volumes/big/snapshots")
	if err != nil {
		return err
	}
	snaps := filepath.Join(m.Dir(), "volumes/big/snapshots")
	var mk, rm []time.Duration
	for i := range b.cfg.mkdirs {
		p := filepath.Join(snaps, "lat"+strconv.Itoa(i))
		start := time.Now()
		if err = os.Mkdir(p, 0o755); err != nil {
			break
		}
		mk = append(mk, time.Since(start))
	}
	for i := range len(mk) {
		start := time.Now()
		if err = os.Remove(filepath.Join(snaps, "lat"+strconv.Itoa(i))); err != nil {
			break
		}
		rm = append(rm, time.Since(start))
	}
	if stopErr := m.Stop(); err == nil {
		err = stopErr
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(b.out, "  %-48s p50 %s  p95 %s\n", "mkdir (snapshot)", measure.Millis(measure.Percentile(mk, 50)), measure.Millis(measure.Percentile(mk, 95)))
	fmt.Fprintf(b.out, "  %-48s p50 %s  p95 %s\n", "rmdir (snapshot delete)", measure.Millis(measure.Percentile(rm, 50)), measure.Millis(measure.Percentile(rm, 95)))
	b.verdicts = append(b.verdicts, fmt.Sprintf("mkdir snapshot latency: p50 %s, p95 %s (no target)", measure.Millis(measure.Percentile(mk, 50)), measure.Millis(measure.Percentile(mk, 95))))
	return nil
}

// tableRow lays out one row of a results table: what, time, MiB/s, peak
// RSS, client CPU, OSD CPU.
const tableRow = "  %-48s %9s %9s %10s %11s %9s\n"

func (b *bench) header() {
	fmt.Fprintf(b.out, tableRow, "", "time", "MiB/s", "peak RSS", "client CPU", "OSD CPU")
}

func (b *bench) row(name string, s sample) {
	fmt.Fprintf(b.out, tableRow, name, fmt.Sprintf("%.2f s", s.time.Seconds()),
		fmt.Sprintf("%.0f", s.throughput()), units.FormatSize(s.rssKB<<10),
		fmt.Sprintf("%.2f s", s.cpu.Seconds()), fmt.Sprintf("%.2f s", s.osdCPU.Seconds()))
}

// ratio prints a ratio against its target (op: ">=" or "<=") and records
// the verdict for the summary.
func (b *bench) ratio(what string, r, target float64, op string) {
	ok := r >= target
	if op == "<=" {
		ok = r <= target
	}
	line := fmt.Sprintf("%s: %.2f (target %s %.2f): %s", what, r, op, target, measure.Verdict(ok))
	fmt.Fprintf(b.out, "  %s\n", line)
	b.verdicts = append(b.verdicts, line)
}

// summary prints every target and whether it was met.
func (b *bench) summary() {
	fmt.Fprintf(b.out, "\nsummary (issue 5's targets)\n")
	for _, v := range b.verdicts {
		fmt.Fprintf(b.out, "  %s\n", v)
	}
}
