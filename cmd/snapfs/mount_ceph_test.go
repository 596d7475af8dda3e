//go:build ceph && cgo && pacific

package main

import (
	"bytes"
	"encoding/json"
	"errors"
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

	"snapfs/internal/qemutest"
)

func init() { binaryTags, binaryCgo = "ceph,pacific", "1" }

// startCeph starts the project's one-node test cluster for this test, with
// the given RBD pools ("rbd" if none), and returns its ceph.conf; the
// cluster is stopped at cleanup.
func startCeph(t *testing.T, pools ...string) string {
	t.Helper()
	dir := t.TempDir()
	start := exec.Command("../../scripts/ceph/start.sh", dir)
	start.Env = append(os.Environ(), "CEPH_OWNER_PID="+strconv.Itoa(os.Getpid()))
	if len(pools) > 0 {
		start.Env = append(start.Env, "CEPH_POOLS="+strings.Join(pools, ","))
	}
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

// TestMountCeph mounts an RBD pool alone, at the root: its images are
// volumes, mkdir takes an RBD snapshot, disk.raw reads exactly what `rbd export` gives, disk.qcow2
// is a clean qcow2 of the same content, rmdir removes the snapshot, and cp
// into import/ creates an image.
func TestMountCeph(t *testing.T) {
	conf := startCeph(t)
	work := t.TempDir()
	src := qemutest.Create(t, "qcow2", filepath.Join(work, "src.qcow2"), "64M")
	qemutest.IO(t, src, "write -P 0x5a 0 3M", "write -P 0xa5 40M 1M")
	raw := qemutest.ConvertRawFile(t, src)
	rbd(t, conf, "import", "--no-progress", raw, "rbd/vm1")

	// No --store: the root is the pool, and imports are staged in TMPDIR.
	mnt := filepath.Join(t.TempDir(), "mnt")
	t.Setenv("TMPDIR", t.TempDir())
	startMount(t, "", mnt, "--ceph-conf", conf, "--pool", "rbd")
	if entries := listNames(t, mnt); !slices.Equal(entries, []string{"import", "instances", "pools", "volumes"}) {
		t.Errorf("ls of the mount: %q", entries)
	}
	if err := os.Mkdir(filepath.Join(mnt, "volumes/vm1/snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := string(rbd(t, conf, "snap", "ls", "rbd/vm1")); !bytes.Contains([]byte(got), []byte("s1")) {
		t.Fatalf("rbd snap ls after mkdir: %s", got)
	}
	// meta.json records how the snapshot was taken.
	var meta struct{ Consistency, Method string }
	if b, err := os.ReadFile(filepath.Join(mnt, "volumes/vm1/snapshots/s1/meta.json")); err != nil {
		t.Fatal(err)
	} else if err := json.Unmarshal(b, &meta); err != nil || meta.Method != "single-image" || meta.Consistency != "crash-consistent" {
		t.Errorf("meta.json of an RBD snapshot: %+v (%v)\n%s", meta, err, b)
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

// TestMountCephPools mounts the local store and two pools at once: the
// root is the local store, each pool is under pools/POOL/, imports and
// snapshots go to the tree they are made in, and a clone in one pool of a
// snapshot in the other shows its parent as a link across pools.
func TestMountCephPools(t *testing.T) {
	conf := startCeph(t, "rbd", "ssd")
	work := t.TempDir()
	src := qemutest.Create(t, "qcow2", filepath.Join(work, "src.qcow2"), "16M")
	qemutest.IO(t, src, "write -P 0x11 0 1M", "write -P 0x22 9M 2M")
	raw := qemutest.ConvertRawFile(t, src)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	rbd(t, conf, "import", "--no-progress", raw, "rbd/base")

	store, mnt := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--ceph-conf", conf, "--pool", "rbd,ssd")
	if got := listNames(t, filepath.Join(mnt, "pools")); !slices.Equal(got, []string{"rbd", "ssd"}) {
		t.Fatalf("ls pools: %q", got)
	}
	for _, pool := range []string{"rbd", "ssd"} {
		if got := listNames(t, filepath.Join(mnt, "pools", pool)); !slices.Equal(got, []string{"import", "volumes"}) {
			t.Errorf("ls pools/%s: %q", pool, got)
		}
	}

	// Each import/ goes to its own tree.
	cp := func(dst string) {
		t.Helper()
		if out, err := exec.Command("cp", src, filepath.Join(mnt, dst)).CombinedOutput(); err != nil {
			t.Fatalf("cp into %s: %v\n%s", dst, err, out)
		}
	}
	cp("import/local1")
	cp("pools/ssd/import/fast1")
	if got := listNames(t, filepath.Join(mnt, "volumes")); !slices.Equal(got, []string{"local1"}) {
		t.Errorf("ls volumes (the local store): %q", got)
	}
	if got := listNames(t, filepath.Join(mnt, "pools/rbd/volumes")); !slices.Equal(got, []string{"base"}) {
		t.Errorf("ls pools/rbd/volumes: %q", got)
	}
	if got := strings.Fields(string(rbd(t, conf, "ls", "ssd"))); !slices.Equal(got, []string{"fast1"}) {
		t.Errorf("rbd ls ssd after cp into pools/ssd/import: %q", got)
	}
	if got := rbd(t, conf, "export", "--no-progress", "ssd/fast1", "-"); !bytes.Equal(got, want) {
		t.Errorf("ssd/fast1 differs from its source")
	}

	// A snapshot in pool rbd, cloned into pool ssd.
	if err := os.Mkdir(filepath.Join(mnt, "pools/rbd/volumes/base/snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	rbd(t, conf, "snap", "protect", "rbd/base@s1")
	rbd(t, conf, "clone", "rbd/base@s1", "ssd/kid")
	kid := filepath.Join(mnt, "pools/ssd/volumes/kid")
	var info struct {
		Parent struct{ Volume, Snapshot string }
	}
	b, err := os.ReadFile(filepath.Join(kid, "info.json"))
	if err == nil {
		err = json.Unmarshal(b, &info)
	}
	if err != nil || info.Parent.Volume != "rbd/base" || info.Parent.Snapshot != "s1" {
		t.Errorf("kid's info.json: parent %+v, %v", info.Parent, err)
	}
	link, err := os.Readlink(filepath.Join(kid, "parent"))
	if err != nil || link != "../../../rbd/volumes/base/snapshots/s1" {
		t.Errorf("readlink pools/ssd/volumes/kid/parent: %q, %v", link, err)
	}
	// The link resolves, inside the mount, to the parent snapshot.
	if got, err := os.ReadFile(filepath.Join(kid, "parent/disk.raw")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("pools/ssd/volumes/kid/parent/disk.raw: %v", err)
	}
	if err := os.Mkdir(filepath.Join(kid, "snapshots/k1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(kid, "snapshots/k1/disk.raw")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("the clone's snapshot k1 does not read as its parent: %v", err)
	}
	// The parent snapshot cannot go while the clone needs it.
	if err := os.Remove(filepath.Join(mnt, "pools/rbd/volumes/base/snapshots/s1")); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("rmdir of a cloned snapshot: %v, want EBUSY", err)
	}
}

// TestMountCephOSDStopped stops the OSD while a snapshot is read through
// the mount: the read fails with ETIMEDOUT within the configured timeout
// (not a hang), the mount stays usable, and once the OSD answers again the
// same open file reads right.
func TestMountCephOSDStopped(t *testing.T) {
	conf := startCeph(t)
	work := t.TempDir()
	data := make([]byte, 64<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>20)
	}
	raw := filepath.Join(work, "data.raw")
	if err := os.WriteFile(raw, data, 0o600); err != nil {
		t.Fatal(err)
	}
	rbd(t, conf, "import", "--no-progress", raw, "rbd/vm")
	rbd(t, conf, "snap", "create", "--no-progress", "rbd/vm@s")

	const timeout = 3 * time.Second
	mnt := filepath.Join(t.TempDir(), "mnt")
	t.Setenv("TMPDIR", t.TempDir())
	startMount(t, "", mnt, "--ceph-conf", conf, "--pool", "rbd", "--ceph-timeout", timeout.String())
	f, err := os.Open(filepath.Join(mnt, "volumes/vm/snapshots/s/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, data[:1<<20]) {
		t.Fatalf("read before the OSD stops: %v", err)
	}

	osd := func(verb string) {
		t.Helper()
		if out, err := exec.Command("../../scripts/ceph/osd.sh", verb, filepath.Dir(conf)).CombinedOutput(); err != nil {
			t.Fatalf("osd.sh %s: %v\n%s", verb, err, out)
		}
	}
	osd("stop")
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			osd("start")
		}
	})
	// Far from what was read: neither the kernel nor a readahead has it.
	start := time.Now()
	_, err = f.ReadAt(buf, 56<<20)
	took := time.Since(start)
	t.Logf("read with the OSD stopped: %v after %v", err, took)
	if !errors.Is(err, syscall.ETIMEDOUT) {
		t.Errorf("read with the OSD stopped: %v, want ETIMEDOUT", err)
	}
	// One FUSE request (disk.raw is direct I/O) waits the timeout for the
	// OSD; twice that is a bound with room for a loaded machine.
	if took > 2*timeout {
		t.Errorf("read with the OSD stopped took %v; --ceph-timeout is %v", took, timeout)
	}
	// The mount answers: its root at once, a listing of the pool with an
	// error in time.
	if got := listNames(t, mnt); len(got) != 4 {
		t.Errorf("ls of the mount with the OSD stopped: %q", got)
	}
	start = time.Now()
	_, err = os.ReadDir(filepath.Join(mnt, "volumes"))
	t.Logf("ls volumes with the OSD stopped: %v after %v", err, time.Since(start))
	if err == nil || time.Since(start) > 2*timeout {
		t.Errorf("ls volumes with the OSD stopped: %v after %v", err, time.Since(start))
	}

	osd("start")
	resumed = true
	deadline := time.Now().Add(time.Minute)
	for {
		_, err = f.ReadAt(buf, 56<<20)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || !bytes.Equal(buf, data[56<<20:57<<20]) {
		t.Fatalf("read after the OSD came back: %v", err)
	}
	// The whole snapshot reads right again, through a new open too.
	g, err := os.Open(filepath.Join(mnt, "volumes/vm/snapshots/s/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	got, err := io.ReadAll(g)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("disk.raw after the OSD came back: %d bytes, %v", len(got), err)
	}
	if got := listNames(t, filepath.Join(mnt, "volumes")); !slices.Equal(got, []string{"vm"}) {
		t.Errorf("ls volumes after the OSD came back: %q", got)
	}
}

// TestMountCephCloneAcrossPools: `ln -s` clones a snapshot of one pool into
// another, by the path ln -s means or by the one the clone's parent link
// shows. The clone reads as `rbd export` of the snapshot, its parent link
// points back, the snapshot cannot go while the clone needs it, and rm of
// the link flattens. Between the local store and a pool the gesture gets
// EXDEV and a log line saying what to do; targets in no tree get ENOENT or
// EINVAL; no refusal creates anything.
func TestMountCephCloneAcrossPools(t *testing.T) {
	conf := startCeph(t, "rbd", "ssd")
	work := t.TempDir()
	src := qemutest.Create(t, "qcow2", filepath.Join(work, "src.qcow2"), "16M")
	qemutest.IO(t, src, "write -P 0x11 0 1M", "write -P 0x22 9M 2M")
	rbd(t, conf, "import", "--no-progress", qemutest.ConvertRawFile(t, src), "rbd/base")

	store, mnt := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	m := startMount(t, store, mnt, "--ceph-conf", conf, "--pool", "rbd,ssd")
	s1 := filepath.Join(mnt, "pools/rbd/volumes/base/snapshots/s1")
	if err := os.Mkdir(s1, 0o755); err != nil {
		t.Fatal(err)
	}
	// The head moves on: a clone that read it would differ from s1.
	rbd(t, conf, "bench", "--io-type", "write", "--io-size", "64K", "--io-total", "2M", "rbd/base")
	want := rbd(t, conf, "export", "--no-progress", "rbd/base@s1", "-")
	if bytes.Equal(rbd(t, conf, "export", "--no-progress", "rbd/base", "-"), want) {
		t.Fatal("rbd bench did not change the head of rbd/base")
	}

	ssd := filepath.Join(mnt, "pools/ssd/volumes")
	for _, c := range []struct{ name, target string }{
		{"kid", "../../../pools/rbd/volumes/base/snapshots/s1"}, // as ln -s means it
		{"kid2", "../../../rbd/volumes/base/snapshots/s1"},      // as the parent link shows it
	} {
		if err := os.Symlink(c.target, filepath.Join(ssd, c.name)); err != nil {
			t.Fatalf("ln -s %s pools/ssd/volumes/%s: %v", c.target, c.name, err)
		}
		var info struct {
			Parent struct{ Pool, Image, Snapshot string }
		}
		if err := json.Unmarshal(rbd(t, conf, "info", "--format", "json", "ssd/"+c.name), &info); err != nil {
			t.Fatal(err)
		}
		if info.Parent.Pool != "rbd" || info.Parent.Image != "base" || info.Parent.Snapshot != "s1" {
			t.Errorf("rbd info ssd/%s: parent %+v", c.name, info.Parent)
		}
		link, err := os.Readlink(filepath.Join(ssd, c.name, "parent"))
		if err != nil || link != "../../../rbd/volumes/base/snapshots/s1" {
			t.Errorf("readlink pools/ssd/volumes/%s/parent: %q, %v", c.name, link, err)
		}
		if got, err := os.ReadFile(filepath.Join(ssd, c.name, "head.raw")); err != nil || !bytes.Equal(got, want) {
			t.Errorf("pools/ssd/volumes/%s/head.raw (%d bytes, %v) differs from rbd export rbd/base@s1", c.name, len(got), err)
		}
	}
	if err := os.Remove(s1); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("rmdir of a snapshot cloned into another pool: %v, want EBUSY", err)
	}

	// The local store and a pool: EXDEV, both ways, and the log says what
	// to do instead.
	if out, err := exec.Command("cp", src, filepath.Join(mnt, "import/local1")).CombinedOutput(); err != nil {
		t.Fatalf("cp into import/: %v\n%s", err, out)
	}
	if err := os.Mkdir(filepath.Join(mnt, "volumes/local1/snapshots/l1"), 0o755); err != nil {
		t.Fatal(err)
	}
	refuse := func(target, link string, want syscall.Errno) {
		t.Helper()
		if err := os.Symlink(target, filepath.Join(mnt, link)); !errors.Is(err, want) {
			t.Errorf("ln -s %s %s: %v, want %v", target, link, err, want)
		}
	}
	refuse("../pools/rbd/volumes/base/snapshots/s1", "volumes/new", syscall.EXDEV)
	if !m.waitOutput("cp pools/rbd/volumes/base/snapshots/s1/disk.raw import/new") {
		t.Errorf("no log line says what to do after EXDEV:\n%s", m.output())
	}
	refuse("../../../volumes/local1/snapshots/l1", "pools/ssd/volumes/new", syscall.EXDEV)
	// Targets in no tree of the mount.
	refuse("../../../pools/nope/volumes/base/snapshots/s1", "pools/ssd/volumes/new", syscall.ENOENT)
	refuse("../../../rbd/volumes/base/snapshots/nosuch", "pools/ssd/volumes/new", syscall.ENOENT)
	refuse("../../../../../../rbd/volumes/base/snapshots/s1", "pools/ssd/volumes/new", syscall.EINVAL)
	if got := strings.Fields(string(rbd(t, conf, "ls", "ssd"))); !slices.Equal(got, []string{"kid", "kid2"}) {
		t.Errorf("rbd ls ssd after the refusals: %q", got)
	}
	if got := listNames(t, filepath.Join(mnt, "volumes")); !slices.Equal(got, []string{"local1"}) {
		t.Errorf("ls volumes (the local store) after the refusals: %q", got)
	}

	// With no --store the root is the first pool: a clone made there of
	// another pool's snapshot links back through pools/.
	t.Setenv("TMPDIR", t.TempDir())
	root := filepath.Join(t.TempDir(), "mnt")
	startMount(t, "", root, "--ceph-conf", conf, "--pool", "ssd,rbd")
	if err := os.Symlink("../pools/rbd/volumes/base/snapshots/s1", filepath.Join(root, "volumes/kid3")); err != nil {
		t.Fatalf("ln -s from the root (pool ssd) to pools/rbd: %v", err)
	}
	if link, err := os.Readlink(filepath.Join(root, "volumes/kid3/parent")); err != nil || link != "../../pools/rbd/volumes/base/snapshots/s1" {
		t.Errorf("readlink volumes/kid3/parent: %q, %v", link, err)
	}
	if got, err := os.ReadFile(filepath.Join(root, "volumes/kid3/head.raw")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("volumes/kid3/head.raw (%d bytes, %v) differs from rbd export rbd/base@s1", len(got), err)
	}

	// rm parent flattens; then nothing needs s1.
	for _, name := range []string{"kid", "kid2", "kid3"} {
		if err := os.Remove(filepath.Join(ssd, name, "parent")); err != nil {
			t.Fatalf("rm pools/ssd/volumes/%s/parent: %v", name, err)
		}
		if _, err := os.Readlink(filepath.Join(ssd, name, "parent")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pools/ssd/volumes/%s/parent after the flatten: %v", name, err)
		}
		if got := rbd(t, conf, "export", "--no-progress", "ssd/"+name, "-"); !bytes.Equal(got, want) {
			t.Errorf("ssd/%s no longer reads as rbd/base@s1 after the flatten", name)
		}
	}
	if err := os.Remove(s1); err != nil {
		t.Errorf("rmdir of s1 once its clones are flat: %v", err)
	}
}

// TestVolumeFlattenPool: `snapfs volume flatten --pool` flattens an RBD
// clone (rbd info shows no parent after), which reads as before, and
// prints the volume with --json; a wrong pool count is a usage error.
func TestVolumeFlattenPool(t *testing.T) {
	conf := startCeph(t)
	work := t.TempDir()
	raw := filepath.Join(work, "base.raw")
	if err := os.WriteFile(raw, bytes.Repeat([]byte{0x5c}, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	rbd(t, conf, "import", "--no-progress", raw, "rbd/base")
	rbd(t, conf, "snap", "create", "rbd/base@s1")
	rbd(t, conf, "snap", "protect", "rbd/base@s1")
	rbd(t, conf, "clone", "rbd/base@s1", "rbd/kid")
	if info := rbd(t, conf, "info", "rbd/kid"); !bytes.Contains(info, []byte("parent: rbd/base@s1")) {
		t.Fatalf("rbd clone made no clone:\n%s", info)
	}

	mustFailWith(t, []string{"volume", "flatten", "--ceph-conf", conf, "--pool", "rbd,rbd", "kid"}, "one pool")
	out := mustSucceed(t, "volume", "flatten", "--ceph-conf", conf, "--pool", "rbd", "--json", "kid")
	var v struct {
		Name   string          `json:"name"`
		Parent json.RawMessage `json:"parent"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Name != "kid" || v.Parent != nil {
		t.Errorf("flatten --json printed %q (%v): want volume kid without a parent", out, err)
	}
	if info := rbd(t, conf, "info", "rbd/kid"); bytes.Contains(info, []byte("parent:")) {
		t.Errorf("rbd/kid still has a parent after the flatten:\n%s", info)
	}
	exported := filepath.Join(work, "kid.raw")
	rbd(t, conf, "export", "--no-progress", "rbd/kid", exported)
	if got, err := os.ReadFile(exported); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5c}, 8<<20)) {
		t.Errorf("rbd/kid after the flatten does not read as rbd/base@s1 (%v)", err)
	}
	// The parent snapshot is free now: rbd can remove it.
	rbd(t, conf, "snap", "unprotect", "rbd/base@s1")
	rbd(t, conf, "snap", "rm", "--no-progress", "rbd/base@s1")
}
