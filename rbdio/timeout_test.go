//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/snapshot"
)

// stopOSD stops the test cluster's OSD with SIGSTOP, as a hung or
// unreachable OSD, and returns the function that continues it (also run
// at cleanup). A real stop and restart would not do: memstore loses every
// object when the OSD restarts. scripts/ceph/osd.sh does both, and returns
// from a stop only once every thread of the OSD has stopped.
func stopOSD(t *testing.T) (cont func()) {
	t.Helper()
	dir := filepath.Dir(cephConf)
	osd := func(verb string) error {
		out, err := exec.Command("../scripts/ceph/osd.sh", verb, dir).CombinedOutput()
		if err != nil {
			return fmt.Errorf("osd.sh %s: %v\n%s", verb, err, out)
		}
		return nil
	}
	if err := osd("stop"); err != nil {
		t.Fatal(err)
	}
	done := false
	cont = func() {
		if !done {
			done = true
			if err := osd("start"); err != nil {
				t.Error(err)
			}
		}
	}
	t.Cleanup(cont)
	return cont
}

func TestOSDStopped(t *testing.T) {
	c := ctx(t)
	const timeout = 3 * time.Second
	cl, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	p := cl.Pools()[0]
	name := uniqueName(t, "osd")
	if _, err := p.CreateVolume(c, name, 16<<20); err != nil {
		t.Fatal(err)
	}
	defer p.DeleteVolume(c, name)
	w := writer(t, name)
	data := randomBytes(16 << 20)
	writeAt(t, w, data, 0)
	w.Close() // else DeleteVolume at the end finds it busy
	snap(t, p, name, "s")
	im, err := p.OpenSnapshot(c, name, "s")
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, 1<<20)
	// A sequential reader: chunks 0 and 1 are read ahead.
	if n, err := im.ReadAt(buf, 0); err != nil || n != len(buf) || !bytes.Equal(buf, data[:1<<20]) {
		t.Fatalf("first read: %d bytes, %v", n, err)
	}
	// The readahead must be done before the OSD stops.
	im.(*image).ra.wg.Wait()

	cont := stopOSD(t)
	start := time.Now()
	// Not read before, nor read ahead: neither we nor librbd (whose
	// default cache policy, writearound, caches no reads) have it.
	n, err := im.ReadAt(buf, 12<<20)
	took := time.Since(start)
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, syscall.ETIMEDOUT) {
		t.Errorf("read with the OSD stopped: %v, want ErrTimeout and ETIMEDOUT%s", err, readData(n, err, buf, data[12<<20:13<<20]))
	}
	if took > 2*timeout {
		t.Errorf("read with the OSD stopped took %v; the timeout is %v", took, timeout)
	}
	// The sequential reader goes on: what was read ahead still reads,
	// then the chunk whose fetch fails gives the error, in time.
	big := make([]byte, 7<<20)
	if n, err := im.ReadAt(big, 1<<20); err != nil || n != len(big) || !bytes.Equal(big, data[1<<20:8<<20]) {
		t.Errorf("read ahead data with the OSD stopped: %v%s", err, readData(n, err, big, data[1<<20:8<<20]))
	}
	start = time.Now()
	n, err = im.ReadAt(buf, 8<<20)
	if !errors.Is(err, ErrTimeout) || time.Since(start) > 2*timeout {
		t.Errorf("sequential read with the OSD stopped: %v after %v, want ErrTimeout%s", err, time.Since(start), readData(n, err, buf, data[8<<20:9<<20]))
	}
	// Metadata calls fail in time too.
	start = time.Now()
	if _, err := p.Volume(c, name); err == nil || time.Since(start) > 3*timeout {
		t.Errorf("Volume with the OSD stopped: %v after %v", err, time.Since(start))
	}
	// A snapshot the mount would take fails in time too.
	start = time.Now()
	if _, err := p.CreateSnapshots(c, []string{name}, "during", snapshot.SnapshotOptions{}); err == nil || time.Since(start) > 3*timeout {
		t.Errorf("snapshot with the OSD stopped: %v after %v", err, time.Since(start))
	}

	cont()
	// Once the OSD is back, the same image reads again. If the mon marked
	// the stopped OSD down meanwhile, it first has to rejoin, which on a
	// loaded machine takes a while: this checks recovery, not its speed.
	resumed := time.Now()
	n, err = readWhenBack(t, p, name, im, buf, 8<<20)
	if err != nil {
		t.Fatalf("read after the OSD came back: %v", err)
	}
	t.Logf("the first read came back %v after SIGCONT", time.Since(resumed).Round(time.Millisecond))
	if !bytes.Equal(buf, data[8<<20:9<<20]) {
		t.Errorf("read after the OSD came back: wrong data")
	}
	// What failed while the OSD was stopped reads too. Not necessarily at
	// once: on a loaded machine the OSD may still be working through the
	// requests that queued while it was stopped (once in CI, this read
	// timed out right after the one above came back in 2 ms), and the
	// placement group of this object may be the one left laggy (once in
	// CI, two minutes long, while the one above served).
	n, err = readWhenBack(t, p, name, im, buf, 12<<20)
	if err != nil || n != len(buf) || !bytes.Equal(buf, data[12<<20:13<<20]) {
		t.Errorf("read at 12 MiB after the OSD came back: %v%s", err, readData(n, err, buf, data[12<<20:13<<20]))
	}
}

// readData tells, for the message of a failed check, what a read that did
// not fail returned: n bytes, the data written (the OSD answered), or not
// (a bug: zeros for a range wrongly taken as a hole, bytes from the wrong
// place); "" for a read that failed.
func readData(n int, err error, got, want []byte) string {
	switch {
	case err != nil:
		return ""
	case n != len(want):
		return fmt.Sprintf(" (%d bytes, want %d)", n, len(want))
	case bytes.Equal(got, want):
		return " (the data written)"
	case !slices.ContainsFunc(got, func(b byte) bool { return b != 0 }):
		return " (zeros, not the data written)"
	}
	return " (not the data written)"
}

// readWhenBack reads buf at off through im, the handle opened before the
// OSD was stopped, until it works or two minutes have passed, and returns
// the last result. If reads fail for 15 s, it logs the cluster's state and reads
// through a new handle: if that fails too, the cluster itself does not
// serve the object. Once in CI, Ceph 16 left placement groups of the
// single OSD "laggy" (snapshots were being trimmed); stops of 30 s did not
// do it again. Marked down, the OSD rejoins (the same process: memstore
// keeps its objects) and peers again. What is checked is that the old
// handle reads once the cluster serves.
func readWhenBack(t *testing.T, p *Pool, name string, im io.ReaderAt, buf []byte, off int64) (int, error) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	diagnosed := false
	for {
		n, err := im.ReadAt(buf, off)
		if err == nil || time.Now().After(deadline) {
			return n, err
		}
		if !diagnosed && time.Since(start) > 15*time.Second {
			diagnosed = true
			if !diagnoseRecovery(t, p, name, off) {
				out, err := exec.Command("ceph", "-c", cephConf, "--connect-timeout", "10", "osd", "down", "0").CombinedOutput()
				t.Logf("ceph osd down 0 (%v): %s", err, out)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// diagnoseRecovery logs what the cluster and a fresh client say while the
// old image handle still fails after the OSD came back: the cluster's
// status, a read through a new handle, and the end of the OSD's log. It
// returns whether the new handle read.
func diagnoseRecovery(t *testing.T, p *Pool, name string, off int64) bool {
	t.Helper()
	for _, args := range [][]string{{"-s"}, {"osd", "dump"}} {
		out, err := exec.Command("ceph", append([]string{"-c", cephConf, "--connect-timeout", "10"}, args...)...).CombinedOutput()
		t.Logf("ceph %s (%v):\n%s", strings.Join(args, " "), err, out)
	}
	fresh, err := p.OpenSnapshot(context.Background(), name, "s")
	if err == nil {
		_, err = fresh.ReadAt(make([]byte, 1<<20), off)
		fresh.Close()
	}
	t.Logf("a read through a new handle: %v", err)
	if log, lerr := os.ReadFile(filepath.Join(filepath.Dir(runDir(t)), "log", "osd.0.log")); lerr == nil {
		t.Logf("end of osd.0.log:\n%s", log[max(0, len(log)-6000):])
	}
	return err == nil
}

// TestFullPoolSaysSo: writes to a pool over its quota wait, and end in
// ErrTimeout; the error of an import says the pool is full, as the
// cluster's health does, rather than read as a dead cluster.
func TestFullPoolSaysSo(t *testing.T) {
	full := tempPool(t, "snapfs-full")
	cli(t, "ceph", "osd", "pool", "set-quota", full, "max_bytes", strconv.Itoa(4<<20))
	filler := filepath.Join(t.TempDir(), "filler")
	if err := os.WriteFile(filler, randomBytes(8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cli(t, "rados", "-p", full, "put", "filler", filler)
	// The monitors mark the pool full once the OSD reports its usage.
	deadline := time.Now().Add(2 * time.Minute)
	for !bytes.Contains(cli(t, "ceph", "health", "detail"), []byte("POOL_FULL")) {
		if time.Now().After(deadline) {
			t.Fatalf("pool %s over its quota is not marked full:\n%s", full, cli(t, "ceph", "health", "detail"))
		}
		time.Sleep(time.Second)
	}

	cl, err := Open(Config{CephConf: cephConf, Pools: []string{full}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	src, _ := sparseRaw(t, 16<<20)
	img, err := snapshot.OpenUntrusted(src)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, err = cl.Pools()[0].ImportVolume(ctx(t), "into-full", img, nil)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "the cluster is full") {
		t.Fatalf("import into a full pool: %v; want ErrTimeout saying the cluster is full", err)
	}
	t.Log(err)
}
