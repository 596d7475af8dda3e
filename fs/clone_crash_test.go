package fs

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// The gestures of clones killed with kill -9 half way, through a mount
// served by a child process (crash_test.go): after a restart everything
// reads as before (or, past the commit, as after), and the gesture can be
// made again, to the end.

// addClone makes kid, a clone of v@mid written over, in the crash world's
// store, and takes the reference of its head.
func addClone(t *testing.T, w *crashWorld) {
	t.Helper()
	store, err := snapshot.OpenLocal(w.cfg.Store)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if _, err := store.Clone(t.Context(), "v", "mid", "kid"); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "kid", "write -P 0x44 2M 1M", "write -z 8M 1M")
	w.refs["volumes/kid/head.raw"] = qemutest.ConvertRawFile(t, headPath(t, store, "kid"))
}

// TestCrashFlattenGesture: rm volumes/kid/parent killed at each step of the
// flatten. While it runs, info.json shows it; after a restart the clone
// and everything else read as before, and rm parent then flattens.
func TestCrashFlattenGesture(t *testing.T) {
	for _, point := range []string{snapshot.PauseFlattenCopying, snapshot.PauseFlattenCopied, snapshot.PauseFlattenRenamed} {
		t.Run(point, func(t *testing.T) {
			w := newCrashWorld(t)
			addClone(t, w)
			mnt := w.cfg.Mountpoint
			parent := filepath.Join(mnt, "volumes/kid/parent")
			infoPath := filepath.Join(mnt, "volumes/kid/info.json")
			s := startServer(t, w.cfg, point)
			// The kernel locks volumes/kid during the unlink: a name
			// in it that is not in the dentry cache waits for the rm
			// to end. Someone watching info.json has looked it up
			// already, and keeps it open here so that the kernel
			// cannot drop it from the cache meanwhile (memory
			// pressure, or drop_caches by another job: that made this
			// test wait 30 s on a loaded machine).
			pin, err := os.Open(infoPath)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- os.Remove(parent) }()
			s.waitPaused(t, point)
			info := make(chan []byte, 1)
			go func() {
				data, err := os.ReadFile(infoPath)
				if err != nil {
					data = []byte(err.Error())
				}
				info <- data
			}()
			select {
			case data := <-info:
				var v struct {
					Parent  *snapshot.SnapshotRef `json:"parent"`
					Flatten *snapshot.Progress    `json:"flatten"`
				}
				if err := json.Unmarshal(data, &v); err != nil || v.Flatten == nil || v.Parent == nil || v.Parent.Snapshot != "mid" {
					t.Errorf("info.json during the flatten shows no flatten of a clone of mid (%v):\n%s", err, data)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("info.json cannot be read while rm parent runs")
			}
			pin.Close()
			s.kill()
			if err := <-done; err == nil {
				t.Error("rm parent cut short by kill -9 reported success")
			}
			cleanStale(t, mnt)
			startServer(t, w.cfg, "")
			w.check(t, "", "")
			// Whether the parent link survived depends on the point (the
			// bottom layer in place means flattened); rm finishes the job.
			if err := os.Remove(parent); err != nil && !os.IsNotExist(err) {
				t.Fatalf("rm parent after the restart: %v", err)
			}
			if _, err := os.Lstat(parent); !os.IsNotExist(err) {
				t.Fatalf("parent link after the flatten: %v", err)
			}
			w.check(t, "", "")
			// The clone no longer needs mid.
			if err := os.Remove(filepath.Join(mnt, "volumes/v/snapshots/mid")); err != nil {
				t.Fatalf("rmdir of the flattened clone's parent snapshot: %v", err)
			}
			delete(w.refs, "volumes/v/snapshots/mid/disk.raw")
			w.check(t, "", "")
		})
	}
}

// TestCrashRevertGesture: echo base > volumes/v/revert killed at each step
// of the revert. After a restart the head reads as before the revert, or
// as base once the revert was committed, every snapshot as before; the
// revert made again ends with the head equal to base.
func TestCrashRevertGesture(t *testing.T) {
	for _, c := range []struct {
		point    string
		reverted bool // the head reads as base after the restart
	}{
		{snapshot.PauseRevertCopying, false},
		{snapshot.PauseRevertWritten, false},
		{snapshot.PauseRevertCommitted, true},
	} {
		t.Run(c.point, func(t *testing.T) {
			w := newCrashWorld(t)
			mnt := w.cfg.Mountpoint
			head := "volumes/v/head.raw"
			oldHead := w.refs[head]
			delete(w.refs, head)
			base := w.refs["volumes/v/snapshots/base/disk.raw"]
			revert := func() error {
				return os.WriteFile(filepath.Join(mnt, "volumes/v/revert"), []byte("base\n"), 0o200)
			}
			s := startServer(t, w.cfg, c.point)
			done := make(chan error, 1)
			go func() { done <- revert() }()
			s.waitPaused(t, c.point)
			s.kill()
			if err := <-done; err == nil {
				t.Error("the revert cut short by kill -9 reported success")
			}
			cleanStale(t, mnt)
			startServer(t, w.cfg, "")
			w.check(t, "", "")
			want := oldHead
			if c.reverted {
				want = base
			}
			if err := compareFiles(filepath.Join(mnt, head), want); err != nil {
				t.Errorf("head after the restart (reverted: %v): %v", c.reverted, err)
			}
			if err := revert(); err != nil {
				t.Fatalf("revert after the restart: %v", err)
			}
			if err := compareFiles(filepath.Join(mnt, head), base); err != nil {
				t.Errorf("head after the revert: %v", err)
			}
			w.check(t, "", "")
		})
	}
}
