package snapshot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapfs/internal/qemutest"
)

// The crash tests run a mutation in a child process (this test binary,
// re-executed with crashChildEnv set), stop it at a named point with
// PauseEnv, kill -9 it there, and check that the store reopens and reads
// exactly as before the mutation, or exactly as after it.

const (
	crashChildEnv = "SNAPFS_TEST_CRASH_CHILD" // the mutation to run
	crashStoreEnv = "SNAPFS_TEST_CRASH_STORE" // the store directory
	crashSrcEnv   = "SNAPFS_TEST_CRASH_SRC"   // the image to import
)

func TestMain(m *testing.M) {
	if op := os.Getenv(crashChildEnv); op != "" {
		if err := crashChild(op); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// crashChild runs one mutation on the store of crashStoreEnv.
func crashChild(op string) error {
	ctx := context.Background()
	s, err := OpenLocal(os.Getenv(crashStoreEnv))
	if err != nil {
		return err
	}
	switch op {
	case "snapshot":
		_, err = s.CreateSnapshots(ctx, []string{"vm"}, "new", SnapshotOptions{})
	case "instance-snapshot":
		_, err = s.CreateInstanceSnapshot(ctx, "inst", "isnap", InstanceSnapshotOptions{})
	case "delete-middle":
		err = s.DeleteSnapshot(ctx, "vm", "s2")
	case "delete-last":
		err = s.DeleteSnapshot(ctx, "vm", "s4")
	case "instance-delete":
		err = s.DeleteInstanceSnapshot(ctx, "inst", "isnap")
	case "import":
		_, err = importFile(ctx, s, "imported", os.Getenv(crashSrcEnv), nil)
	case "volume-delete":
		err = s.DeleteVolume(ctx, "loose")
	case "flatten":
		err = s.Flatten(ctx, "kid")
	case "revert":
		err = s.Revert(ctx, "vm", "s2")
	case "restore":
		_, err = RestoreDir(ctx, s, os.Getenv(crashSrcEnv), "")
	default:
		err = fmt.Errorf("unknown op %q", op)
	}
	return err
}

// runChild runs op in a child process until it pauses at point, then
// kills it with SIGKILL. With point "" the child runs to completion.
func runChild(t *testing.T, op, store, src, point string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+op, crashStoreEnv+"="+store, crashSrcEnv+"="+src, PauseEnv+"="+point)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(2 * time.Minute)
	var out []string
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				err := cmd.Wait()
				if point != "" {
					t.Fatalf("%s: the child ended (%v) without reaching %s: %s", op, err, point, strings.Join(out, "\n"))
				}
				if err != nil {
					t.Fatalf("%s: child: %v: %s", op, err, strings.Join(out, "\n"))
				}
				return
			}
			out = append(out, line)
			if point != "" && line == "snapfs: paused at "+point {
				cmd.Process.Kill() // SIGKILL: no cleanup of any kind
				cmd.Wait()
				for range lines {
				}
				return
			}
		case <-timeout:
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%s: the child did not reach %s in 2 minutes: %s", op, point, strings.Join(out, "\n"))
		}
	}
}

// storeState is what a whole store reads: every volume's snapshots and
// head, and every instance snapshot record.
type storeState struct {
	volumes   map[string]state
	parents   map[string]string   // volume -> "VOL@SNAP" of a clone, "" for none
	instances map[string][]string // instance -> its snapshot names
}

// captureStore reads the whole store; with oracle, every image is also
// checked against qemu-img (see capture).
func captureStore(t *testing.T, s *LocalStore, oracle bool) storeState {
	t.Helper()
	ctx := context.Background()
	st := storeState{volumes: map[string]state{}, parents: map[string]string{}, instances: map[string][]string{}}
	vols, err := s.ListVolumes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vols {
		st.volumes[v.Name] = captureWith(t, s, v.Name, oracle)
		if v.Parent != nil {
			st.parents[v.Name] = v.Parent.Volume + "@" + v.Parent.Snapshot
		} else {
			st.parents[v.Name] = ""
		}
		if v.Flatten != nil {
			t.Errorf("volume %s shows a flatten in progress: %+v", v.Name, v.Flatten)
		}
	}
	insts, err := s.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range insts {
		snaps, err := s.ListInstanceSnapshots(ctx, in.Name)
		if err != nil {
			t.Fatal(err)
		}
		st.instances[in.Name] = []string{}
		for _, sn := range snaps {
			st.instances[in.Name] = append(st.instances[in.Name], sn.Name)
		}
	}
	return st
}

// equalStores returns "" when a and b read the same, else what differs.
func equalStores(a, b storeState) string {
	if fmt.Sprint(a.instances) != fmt.Sprint(b.instances) {
		return fmt.Sprintf("instance snapshots %v != %v", a.instances, b.instances)
	}
	if fmt.Sprint(a.parents) != fmt.Sprint(b.parents) {
		return fmt.Sprintf("clone parents %v != %v", a.parents, b.parents)
	}
	if len(a.volumes) != len(b.volumes) {
		return fmt.Sprintf("%d volumes != %d", len(a.volumes), len(b.volumes))
	}
	for name, va := range a.volumes {
		vb, ok := b.volumes[name]
		if !ok {
			return "volume " + name + " missing"
		}
		if len(va) != len(vb) {
			return fmt.Sprintf("volume %s: %d snapshots+head != %d", name, len(va), len(vb))
		}
		for snap, data := range va {
			if string(vb[snap]) != string(data) {
				return fmt.Sprintf("volume %s: snapshot %q (\"\" is the head) differs", name, snap)
			}
		}
	}
	return ""
}

// crashFixture makes a store with volume vm (snapshots s1..s4 and a
// written head), volume kid cloned from vm@s3 (snapshot k1 and a written
// head), volume other, instance inst over vm and other, volume loose, and
// an image to import. withInstanceSnapshot adds instance snapshot isnap.
func crashFixture(t *testing.T, withInstanceSnapshot bool) (dir, src string) {
	t.Helper()
	dir = t.TempDir()
	s, err := OpenLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	buildChain(t, s, "vm")
	if _, err := s.Clone(context.Background(), "vm", "s3", "kid"); err != nil {
		t.Fatal(err)
	}
	writeHead(t, s, "kid", "write -P 0x81 0 64k", "write -z 1536k 64k")
	mustSnapshot(t, s, "kid", "k1")
	writeHead(t, s, "kid", "write -P 0x82 3M 64k")
	mustVolume(t, s, "other", 2<<20)
	writeHead(t, s, "other", "write -P 0x99 1M 64k")
	mustVolume(t, s, "loose", 1<<20)
	writeHead(t, s, "loose", "write -P 0x77 0 64k")
	mustSnapshot(t, s, "loose", "l1")
	ctx := context.Background()
	if _, err := s.CreateInstance(ctx, "inst", []Disk{{Device: "vda", Volume: "vm"}, {Device: "vdb", Volume: "other"}}); err != nil {
		t.Fatal(err)
	}
	if withInstanceSnapshot {
		if _, err := s.CreateInstanceSnapshot(ctx, "inst", "isnap", InstanceSnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		writeHead(t, s, "vm", "write -P 0xaa 0 64k")
	}
	src = qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "src.qcow2"), "32M")
	qemutest.IO(t, src, "write -P 7 0 24M")
	return dir, src
}

func TestCrash(t *testing.T) {
	for _, c := range []struct {
		op       string
		instSnap bool     // the fixture has instance snapshot isnap
		before   []string // points after which the store must read as before
		after    []string // points after which it must read as after
	}{
		{op: "snapshot", before: []string{PauseSnapshotWritten}, after: []string{PauseSnapshotCommitted}},
		{op: "instance-snapshot", before: []string{PauseSnapshotWritten}, after: []string{PauseSnapshotCommitted}},
		// Once the merged child is in place, the next open finishes the
		// delete.
		{op: "delete-middle", before: []string{PauseDeleteMerging, PauseDeleteMerged}, after: []string{PauseDeleteRenamed, PauseDeleteCommitted}},
		{op: "delete-last", before: []string{PauseDeleteMerged}, after: []string{PauseDeleteRenamed, PauseDeleteCommitted}},
		{op: "import", before: []string{PauseImportConverting, PauseImportWritten}},
		{op: "volume-delete", after: []string{PauseVolumeDeleteCommitted}},
		// Once marked, an instance snapshot delete is finished by the
		// next open, wherever it was cut.
		{op: "instance-delete", instSnap: true, after: []string{PauseInstanceDeleteMarked, PauseDeleteMerged, PauseDeleteCommitted}},
		// Once the standalone bottom layer is in place, the next open
		// cuts the link.
		{op: "flatten", before: []string{PauseFlattenCopying, PauseFlattenCopied}, after: []string{PauseFlattenRenamed}},
		{op: "revert", before: []string{PauseRevertCopying, PauseRevertWritten}, after: []string{PauseRevertCommitted}},
		// A restore of inst@isnap: all of it, or nothing.
		{op: "restore", instSnap: true, before: []string{PauseRestoreConverting, PauseRestoreWritten}},
	} {
		t.Run(c.op, func(t *testing.T) {
			t.Parallel()
			// The reference states: before, and after a run that is not
			// interrupted, both judged by qemu-img. Each crash runs on a
			// copy of the fixture (a store can be moved: it holds no
			// absolute path).
			fixture, src := crashFixture(t, c.instSnap)
			if c.op == "restore" {
				// The folder the mount serves, copied out.
				src = filepath.Join(t.TempDir(), "isnap")
				exportInstanceSnapshot(t, reopen(t, fixture), "inst", "isnap", src)
			}
			before := captureStore(t, reopen(t, copyDir(t, fixture)), true)
			doneDir := copyDir(t, fixture)
			runChild(t, c.op, doneDir, src, "")
			after := captureStore(t, reopen(t, doneDir), true)
			if equalStores(before, after) == "" {
				t.Fatalf("%s changes nothing: the test tests nothing", c.op)
			}
			points := append(append([]string{}, c.before...), c.after...)
			for i, point := range points {
				want, wantName := before, "before"
				if i >= len(c.before) {
					want, wantName = after, "after"
				}
				dir := copyDir(t, fixture)
				runChild(t, c.op, dir, src, point)
				s := reopen(t, dir)
				got := captureStore(t, s, false)
				if diff := equalStores(got, want); diff != "" {
					t.Errorf("killed at %s: the store does not read as %s the %s: %s", point, wantName, c.op, diff)
				}
				checkNoStrayFiles(t, s)
				s.Close()
				if wantName == "before" {
					// The mutation can be run again, to the end.
					runChild(t, c.op, dir, src, "")
					if diff := equalStores(captureStore(t, reopen(t, dir), false), after); diff != "" {
						t.Errorf("killed at %s, run again: the store does not read as after the %s: %s", point, c.op, diff)
					}
				}
			}
		})
	}
}

// copyDir copies the store in dir to a new temp directory.
func copyDir(t *testing.T, dir string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		return os.WriteFile(target, data, info.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestPauseIsOff: without the environment variable, pauseAt returns.
func TestPauseIsOff(t *testing.T) {
	if pausePoint != "" {
		t.Fatalf("%s is set in the test environment", PauseEnv)
	}
	done := make(chan struct{})
	go func() { pauseAt(PauseSnapshotWritten); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("pauseAt paused")
	}
}

// TestCrashThenDeleteBelow: after a delete cut short once the merged child
// is in place, deleting the snapshot below (whose layer the old child read
// through, the merged one no longer does) keeps everything readable.
func TestCrashThenDeleteBelow(t *testing.T) {
	ctx := context.Background()
	dir, _ := crashFixture(t, false)
	before := captureWith(t, reopen(t, dir), "vm", false)
	runChild(t, "delete-middle", dir, "", PauseDeleteRenamed) // deletes s2
	s := reopen(t, dir)
	if err := s.DeleteSnapshot(ctx, "vm", "s1"); err != nil {
		t.Fatal(err)
	}
	sameState(t, capture(t, s, "vm"), before, "s1", "s2")
	checkNoStrayFiles(t, s)
}

// An instance snapshot delete killed half-way, seen by a store opened
// before the kill (a mount): the disk snapshot left over cannot be
// deleted as its instance snapshot's (that one is hidden once marked), so
// deleting it finishes the instance snapshot's delete, instead of failing
// with ErrBusy until the next open.
func TestCrashInstanceDeleteSeenLive(t *testing.T) {
	ctx := context.Background()
	fixture, src := crashFixture(t, true)
	doneDir := copyDir(t, fixture)
	runChild(t, "instance-delete", doneDir, src, "")
	after := captureStore(t, reopen(t, doneDir), true)

	dir := copyDir(t, fixture)
	live := reopen(t, dir)
	defer live.Close()
	// Killed once vda's snapshot is deleted, before vdb's.
	runChild(t, "instance-delete", dir, src, PauseDeleteCommitted)
	if _, err := live.Snapshot(ctx, "vm", "isnap"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("vm@isnap after the kill: %v, want ErrNotFound", err)
	}
	if _, err := live.Snapshot(ctx, "other", "isnap"); err != nil {
		t.Fatalf("other@isnap after the kill: %v (the kill came too late to test anything)", err)
	}
	if _, err := live.InstanceSnapshot(ctx, "inst", "isnap"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("inst@isnap after the kill: %v, want ErrNotFound (hidden)", err)
	}
	if err := live.DeleteSnapshot(ctx, "other", "isnap"); err != nil {
		t.Fatalf("deleting the disk snapshot left over: %v", err)
	}
	if diff := equalStores(captureStore(t, live, false), after); diff != "" {
		t.Errorf("the store does not read as after the instance snapshot delete: %s", diff)
	}
	m, err := live.load()
	if err != nil {
		t.Fatal(err)
	}
	if i := m.Instances["inst"].findRecord("isnap"); i >= 0 {
		t.Errorf("the record of inst@isnap is still there: %+v", m.Instances["inst"].Snapshots[i])
	}
	// The killed child's layer file is an orphan until the next open.
	s := reopen(t, dir)
	checkNoStrayFiles(t, s)
	s.Close()
}
