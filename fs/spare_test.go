package fs

import (
	"bytes"
	"context"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
	"snapfs/snapshot"
)

// countingBackend is a real backend that counts the snapshots it opens and
// the ones still open.
type countingBackend struct {
	snapshot.Backend
	opened, open atomic.Int64
}

func (b *countingBackend) OpenSnapshot(ctx context.Context, volume, name string) (qcow.Image, error) {
	img, err := b.Backend.OpenSnapshot(ctx, volume, name)
	if err != nil {
		return nil, err
	}
	b.opened.Add(1)
	b.open.Add(1)
	return &countedImage{Image: img, open: &b.open}, nil
}

type countedImage struct {
	qcow.Image
	open *atomic.Int64
}

func (c *countedImage) Close() error {
	c.open.Add(-1)
	return c.Image.Close()
}

// TestStatThenOpenOpensOnce: cp and cat stat a file, then open it; the
// export stat opened serves the open, and one that no open takes is closed
// after a moment, or when the mount goes.
func TestStatThenOpenOpensOnce(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 0x5a 0 1M")
	if _, err := store.CreateSnapshots(context.Background(), []string{"v"}, "s", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	b := &countingBackend{Backend: store}
	m := testMount(t, store, func(c *Config) { c.Backend = b })
	raw := m.path("volumes", "v", "snapshots", "s", "disk.raw")
	if _, err := os.Stat(raw); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if want := qemutest.ConvertRaw(t, snapshotPath(t, store, "v", "s")); !bytes.Equal(got, want) {
		t.Fatal("disk.raw differs from qemu-img convert")
	}
	if n := b.opened.Load(); n != 1 {
		t.Errorf("stat then read opened the snapshot %d times, want 1", n)
	}
	if n := b.open.Load(); n != 0 {
		t.Errorf("%d images still open after the read", n)
	}

	// Stat alone: the export waits for an open, then is closed.
	if _, err := os.Stat(m.path("volumes", "v", "snapshots", "s", "disk.qcow2")); err != nil {
		t.Fatal(err)
	}
	if n := b.open.Load(); n != 1 {
		t.Errorf("after a stat, %d images open, want the one kept for an open", n)
	}
	deadline := time.Now().Add(spareFor + 5*time.Second)
	for b.open.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := b.open.Load(); n != 0 {
		t.Errorf("%v after a stat, %d images still open", spareFor+5*time.Second, n)
	}

	// Stat, then unmount: Wait closes what waits, before the caller
	// closes the backend.
	dir := t.TempDir()
	srv, err := Mount(dir, Config{Backend: b, UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), SelfAccess: true})
	if err != nil {
		t.Fatal(err)
	}
	registerMount(dir)
	if _, err := os.Stat(dir + "/volumes/v/snapshots/s/disk.raw"); err != nil {
		t.Error(err)
	}
	if err := srv.Unmount(); err != nil {
		t.Fatal(err)
	}
	srv.Wait()
	if n := b.open.Load(); n != 0 {
		t.Errorf("after Wait, %d images still open", n)
	}
}
