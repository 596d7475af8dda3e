//go:build ceph && cgo && pacific

package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"snapfs/internal/qemutest"
)

func init() { binaryTags, binaryCgo = "ceph,pacific", "1" }

// startCeph starts the project's one-node test cluster for this test and
// returns its ceph.conf; the cluster is stopped at cleanup.
func startCeph(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	start := exec.Command("../../scripts/ceph/start.sh", dir)
	start.Env = append(os.Environ(), "CEPH_OWNER_PID="+strconv.Itoa(os.Getpid()))
	t.Cleanup(func() {
		if out, err := exec.Command("../../scripts/ceph/stop.sh", dir).CombinedOutput(); err != nil {
			t.Errorf("stopping the test cluster: %v\n%s", err, out)
		}
	})
	if out, err := start.CombinedOutput(); err != nil {
		t.Fatalf("starting the test cluster: %v\n%s", err, out)
	}
	return filepath.Join(dir, "ceph.conf")
}

func rbd(t *testing.T, conf string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("rbd", append([]string{"-c", conf}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("rbd %v: %v\n%s", args, err, stderr.String())
	}
	return out
}

// TestMountCeph mounts an RBD pool: its images are volumes, mkdir takes an
// RBD snapshot, disk.raw reads exactly what `rbd export` gives, disk.qcow2
// is a clean qcow2 of the same content, rmdir removes the snapshot, and cp
// into import/ creates an image.
func TestMountCeph(t *testing.T) {
	conf := startCeph(t)
	work := t.TempDir()
	src := qemutest.Create(t, "qcow2", filepath.Join(work, "src.qcow2"), "64M")
	qemutest.IO(t, src, "write -P 0x5a 0 3M", "write -P 0xa5 40M 1M")
	raw := qemutest.ConvertRawFile(t, src)
	rbd(t, conf, "import", "--no-progress", raw, "rbd/vm1")

	store, mnt := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--ceph-conf", conf, "--pool", "rbd")
	if err := os.Mkdir(filepath.Join(mnt, "volumes/vm1/snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := string(rbd(t, conf, "snap", "ls", "rbd/vm1")); !bytes.Contains([]byte(got), []byte("s1")) {
		t.Fatalf("rbd snap ls after mkdir: %s", got)
	}
	want := rbd(t, conf, "export", "--no-progress", "rbd/vm1@s1", "-")
	got, err := os.ReadFile(filepath.Join(mnt, "volumes/vm1/snapshots/s1/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("disk.raw (%d bytes) differs from rbd export (%d bytes)", len(got), len(want))
	}
	q := filepath.Join(work, "s1.qcow2")
	qemutest.Img(t, "convert", "-O", "qcow2", filepath.Join(mnt, "volumes/vm1/snapshots/s1/disk.qcow2"), q)
	qemutest.Check(t, filepath.Join(mnt, "volumes/vm1/snapshots/s1/disk.qcow2"))
	qemutest.Compare(t, raw, q)

	cp := exec.Command("cp", src, filepath.Join(mnt, "import/vm2"))
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("cp into import/: %v\n%s", err, out)
	}
	if got := rbd(t, conf, "export", "--no-progress", "rbd/vm2", "-"); !bytes.Equal(got, want) {
		t.Fatalf("imported image differs from its source")
	}
	if err := os.Remove(filepath.Join(mnt, "volumes/vm1/snapshots/s1")); err != nil {
		t.Fatal(err)
	}
	if got := rbd(t, conf, "snap", "ls", "rbd/vm1"); bytes.Contains(got, []byte("s1")) {
		t.Fatalf("rbd snap ls after rmdir: %s", got)
	}
}
