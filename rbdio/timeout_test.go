//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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
// object when the OSD restarts.
func stopOSD(t *testing.T) (cont func()) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(runDir(t), "osd.0.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	// The PID file must be the OSD of this cluster, not a stranger.
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !bytes.Contains(cmdline, []byte(cephConf)) {
		t.Fatalf("pid %d is not the OSD of %s", pid, cephConf)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	done := false
	cont = func() {
		if !done {
			done = true
			syscall.Kill(pid, syscall.SIGCONT)
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
	if _, err := im.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // let the readahead finish

	cont := stopOSD(t)
	start := time.Now()
	_, err = im.ReadAt(buf, 12<<20) // not read before: no cache answers
	took := time.Since(start)
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, syscall.ETIMEDOUT) {
		t.Errorf("read with the OSD stopped: %v, want ErrTimeout and ETIMEDOUT", err)
	}
	if took > 2*timeout {
		t.Errorf("read with the OSD stopped took %v; the timeout is %v", took, timeout)
	}
	// The sequential reader goes on: what was read ahead still reads,
	// then the chunk whose fetch fails gives the error, in time.
	big := make([]byte, 7<<20)
	if _, err := im.ReadAt(big, 1<<20); err != nil || !bytes.Equal(big, data[1<<20:8<<20]) {
		t.Errorf("read ahead data with the OSD stopped: %v", err)
	}
	start = time.Now()
	_, err = im.ReadAt(buf, 8<<20)
	if !errors.Is(err, ErrTimeout) || time.Since(start) > 2*timeout {
		t.Errorf("sequential read with the OSD stopped: %v after %v, want ErrTimeout", err, time.Since(start))
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
	deadline := resumed.Add(2 * time.Minute)
	diagnosed := false
	for {
		_, err = im.ReadAt(buf, 8<<20)
		if err == nil || time.Now().After(deadline) {
			break
		}
		if !diagnosed && time.Since(resumed) > 15*time.Second {
			diagnosed = true
			diagnoseRecovery(t, p, name)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("read after the OSD came back: %v", err)
	}
	t.Logf("the first read came back %v after SIGCONT", time.Since(resumed).Round(time.Millisecond))
	if !bytes.Equal(buf, data[8<<20:9<<20]) {
		t.Errorf("read after the OSD came back: wrong data")
	}
}

// diagnoseRecovery logs what the cluster and a fresh client say while the
// old image handle still fails after the OSD came back: the cluster's
// status, a read through a new handle, and the end of the OSD's log.
func diagnoseRecovery(t *testing.T, p *Pool, name string) {
	t.Helper()
	for _, args := range [][]string{{"-s"}, {"osd", "dump"}} {
		out, err := exec.Command("ceph", append([]string{"-c", cephConf, "--connect-timeout", "10"}, args...)...).CombinedOutput()
		t.Logf("ceph %s (%v):\n%s", strings.Join(args, " "), err, out)
	}
	fresh, err := p.OpenSnapshot(context.Background(), name, "s")
	if err == nil {
		_, err = fresh.ReadAt(make([]byte, 1<<20), 8<<20)
		fresh.Close()
	}
	t.Logf("a read through a new handle: %v", err)
	if log, err := os.ReadFile(filepath.Join(filepath.Dir(runDir(t)), "log", "osd.0.log")); err == nil {
		t.Logf("end of osd.0.log:\n%s", log[max(0, len(log)-6000):])
	}
}
