package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"snapfs/internal/qemutest"
)

// crash leaves h as a killed process would: its locks gone, neither
// committed nor aborted.
func (h *ExternalHead) crash() {
	h.done = true
	h.nf.release()
	h.release()
}

// TestExternalHead switches a volume's head the way a libvirt external
// snapshot does: the store prepares the overlay, qemu (here qemu-io)
// writes to it, the store commits; the old head is the snapshot, the
// prepared file the head, qemu-img reads both as the store says. Abort
// leaves the store as it was.
func TestExternalHead(t *testing.T) {
	ctx := context.Background()
	s, err := OpenLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.CreateVolume(ctx, "vm", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	qemutest.IO(t, v.HeadPath, "write -P 0x11 0 1M")
	before := qemutest.ConvertRaw(t, v.HeadPath)

	if _, err := s.PrepareExternalHead(ctx, filepath.Join(s.Dir(), "nope.qcow2"), "s1", SnapshotOptions{}); !errors.Is(err, ErrNotFound) {
		t.Errorf("a file that is no head: %v, want ErrNotFound", err)
	}
	h, err := s.PrepareExternalHead(ctx, v.HeadPath, "s1", SnapshotOptions{Metadata: map[string]string{"by": "test"}})
	if err != nil {
		t.Fatal(err)
	}
	if h.Volume != "vm" || h.OldPath != v.HeadPath || filepath.Dir(h.Path) != filepath.Dir(v.HeadPath) {
		t.Errorf("prepared %+v for head %s", h, v.HeadPath)
	}
	qemutest.IO(t, h.Path, "write -P 0x22 1M 1M") // qemu switched and writes on
	if err := h.Commit(ctx, Quiesced); err != nil {
		t.Fatal(err)
	}
	v2, err := s.Volume(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	snap, err := s.Snapshot(ctx, "vm", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if v2.HeadPath != h.Path || snap.Consistency != Quiesced || snap.Metadata["by"] != "test" {
		t.Errorf("after commit: head %s (want %s), snapshot %+v", v2.HeadPath, h.Path, snap)
	}
	img, err := s.OpenSnapshot(ctx, "vm", "s1")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, img.Size())
	img.ReadAt(got, 0)
	img.Close()
	if string(got) != string(before) {
		t.Error("the snapshot does not read as the head did before the switch")
	}
	head, err := s.OpenHead(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	got = make([]byte, head.Size())
	head.ReadAt(got, 0)
	head.Close()
	if string(got) != string(qemutest.ConvertRaw(t, h.Path)) {
		t.Error("the store's head does not read as qemu-img reads the file qemu wrote to")
	}
	if _, err := os.Stat(s.intentPath("vm")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("intent left after commit: %v", err)
	}

	// Abort: nothing changes, no file left.
	h, err = s.PrepareExternalHead(ctx, v2.HeadPath, "s2", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h.Abort()
	if _, err := os.Stat(h.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("aborted head %s still there: %v", h.Path, err)
	}
	v3, _ := s.Volume(ctx, "vm")
	if snaps, _ := s.ListSnapshots(ctx, "vm"); v3.HeadPath != v2.HeadPath || len(snaps) != 1 {
		t.Errorf("after abort: head %s (want %s), %d snapshots", v3.HeadPath, v2.HeadPath, len(snaps))
	}
	if _, err := s.PrepareExternalHead(ctx, v2.HeadPath, "s1", SnapshotOptions{}); !errors.Is(err, ErrExists) {
		t.Errorf("same name again: %v, want ErrExists", err)
	}
}

// TestExternalHeadCrash kills the switch between prepare and commit: a
// prepared file nothing wrote to is removed by the next OpenLocal (the
// store is as it was); one that was written to (qemu switched) becomes the
// head, its snapshot recorded with consistency none.
func TestExternalHeadCrash(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := OpenLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.CreateVolume(ctx, "vm", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.PrepareExternalHead(ctx, v.HeadPath, "s1", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h.crash()
	s.Close()
	s, err = OpenLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(h.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unused prepared head %s survived the reopen: %v", h.Path, err)
	}
	v2, _ := s.Volume(ctx, "vm")
	if snaps, _ := s.ListSnapshots(ctx, "vm"); v2.HeadPath != v.HeadPath || len(snaps) != 0 {
		t.Errorf("after a crash before the switch: head %s (want %s), %d snapshots", v2.HeadPath, v.HeadPath, len(snaps))
	}

	h, err = s.PrepareExternalHead(ctx, v.HeadPath, "s1", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	qemutest.IO(t, h.Path, "write -P 0x33 0 1M")
	h.crash()
	s.Close()
	s, err = OpenLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	v2, err = s.Volume(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	snap, err := s.Snapshot(ctx, "vm", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if v2.HeadPath != h.Path || snap.Consistency != None {
		t.Errorf("after a crash after the switch: head %s (want %s), snapshot %+v", v2.HeadPath, h.Path, snap)
	}
	if _, err := os.Stat(s.intentPath("vm")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("intent left after recovery: %v", err)
	}

	// A stale intent (its volume deleted since) does not keep the store
	// from opening, and its unused file goes.
	h, err = s.PrepareExternalHead(ctx, v2.HeadPath, "s2", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h.crash()
	if err := s.DeleteSnapshot(ctx, "vm", "s1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = OpenLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := os.Stat(h.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stale prepared head %s survived: %v", h.Path, err)
	}
}
