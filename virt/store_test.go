//go:build libvirt && cgo

package virt

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"snapfs/qcow"
	"snapfs/snapshot"
	"snapfs/virt/virttest"
)

// storeGuest starts a guest whose vdb runs off the head of local-store
// volume "data" (an ext4 filesystem) and whose vdc is a plain qcow2 file,
// and a provider that knows the store.
func storeGuest(t *testing.T) (*guest, *Provider, *snapshot.LocalStore) {
	t.Helper()
	ctx := testCtx(t)
	dir := t.TempDir()
	store, err := snapshot.OpenLocal(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	src, err := qcow.OpenPath(ext4Image(t, dir, "vdb"), qcow.Options{})
	if err != nil {
		t.Fatal(err)
	}
	vol, err := store.ImportVolume(ctx, "data", src, nil)
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	g := newGuestOn(t, dir, []virttest.Disk{{Device: "vdb", File: vol.HeadPath}, {Device: "vdc", File: ext4Image(t, dir, "vdc")}})
	p := testProvider(t, Config{Store: store, VolumeOf: func(path string) (string, bool) {
		v, err := store.Volume(ctx, "data")
		return "data", err == nil && v.HeadPath == path
	}})
	return g, p, store
}

// TestSnapshotStoreHead is mkdir on a running domain whose disk is a
// local-store volume's head: the store makes the new head and records the
// snapshot, so that afterwards the volume's snapshot is the frozen disk (a
// clean ext4, as qemu-img reads the layer) and its head_path the file qemu
// writes to; the plain qcow2 disk beside it is snapshotted as before. A
// running domain's store snapshot is not deleted (EBUSY); shut off, the
// store reverts and deletes it, and the domain starts off its head.
func TestSnapshotStoreHead(t *testing.T) {
	g, p, store := storeGuest(t)
	ctx := testCtx(t)
	oldHead := g.disks["vdb"]

	rec, err := p.SnapshotDisks(ctx, g.name, "s1", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Consistency != snapshot.Quiesced {
		t.Errorf("consistency %s (%s)", rec.Consistency, rec.Why)
	}
	vol, err := store.Volume(ctx, "data")
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := store.ListSnapshots(ctx, "data")
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || snaps[0].Name != "s1" || snaps[0].Consistency != snapshot.Quiesced {
		t.Fatalf("store snapshots %+v, want s1, quiesced", snaps)
	}
	vdb, vdc := rec.disk("vdb"), rec.disk("vdc")
	if !vdb.Store || vdb.Volume != "data" || vdb.Layer != oldHead || vdb.Overlay != vol.HeadPath {
		t.Errorf("vdb record %+v; volume head %s, old head %s", vdb, vol.HeadPath, oldHead)
	}
	if vol.HeadPath == oldHead || filepath.Dir(vol.HeadPath) != filepath.Dir(oldHead) {
		t.Errorf("new head %s, old head %s: want a new file of the store", vol.HeadPath, oldHead)
	}
	if vdc.Store || vdc.Layer != g.disks["vdc"] || strings.HasPrefix(vdc.Overlay, filepath.Dir(oldHead)) {
		t.Errorf("plain disk record %+v", vdc)
	}
	xml, err := g.dom.GetXMLDesc(0)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(xml, "'"+vol.HeadPath+"'") {
		t.Errorf("the domain does not run off the store's new head %s", vol.HeadPath)
	}

	// The volume's snapshot is the frozen filesystem.
	raw := rawOf(t, oldHead)
	if needsRecovery, clean := ext4State(t, raw); needsRecovery || !clean {
		t.Errorf("store snapshot: needs_recovery %v, e2fsck -fn clean %v", needsRecovery, clean)
	}
	img, err := store.OpenSnapshot(ctx, "data", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sha256Image(t, img), sha256File(t, raw); got != want {
		t.Errorf("the store reads s1 as %s, qemu-img the layer as %s", got, want)
	}
	img.Close()

	// The guest writes on, into the store's head: it grows past an empty
	// overlay of the same size.
	g.waitHeartbeats(3, time.Minute)
	empty := filepath.Join(t.TempDir(), "empty.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", oldHead, "-F", "qcow2", empty)
	if a, b := fileSize(t, vol.HeadPath), fileSize(t, empty); a <= b {
		t.Errorf("the new head is %d bytes, an empty overlay %d: the guest does not write to it", a, b)
	}

	// rmdir while it runs: refused, nothing changed.
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "s1"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete on a running domain: %v, want ErrBusy", err)
	}
	if list, _ := p.ListInstanceSnapshots(ctx, g.name); len(list) != 1 {
		t.Errorf("after the refused delete: %d snapshots", len(list))
	}
	if snaps, _ := store.ListSnapshots(ctx, "data"); len(snaps) != 1 {
		t.Errorf("after the refused delete: the store has %d snapshots", len(snaps))
	}

	// Shut off, the store reverts the volume: the domain runs off its new
	// head, which reads as s1.
	if err := g.dom.Destroy(); err != nil {
		t.Fatal(err)
	}
	if err := p.Revert(ctx, g.name, "s1"); err != nil {
		t.Fatal(err)
	}
	vol, err = store.Volume(ctx, "data")
	if err != nil {
		t.Fatal(err)
	}
	if xml, _ := g.dom.GetXMLDesc(0); !strings.Contains(xml, "'"+vol.HeadPath+"'") {
		t.Errorf("after the revert the domain does not use the store's head %s", vol.HeadPath)
	}
	head, err := store.OpenHead(ctx, "data")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sha256Image(t, head), sha256File(t, raw); got != want {
		t.Errorf("after the revert the head reads %s, s1 %s", got, want)
	}
	head.Close()

	// The store deletes it: its layer merges into the head, which keeps
	// its name, so the domain still starts off it.
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "s1"); err != nil {
		t.Fatal(err)
	}
	if snaps, _ := store.ListSnapshots(ctx, "data"); len(snaps) != 0 {
		t.Errorf("after the delete: the store has %d snapshots", len(snaps))
	}
	if v, _ := store.Volume(ctx, "data"); v.HeadPath != vol.HeadPath {
		t.Errorf("after the delete the head is %s, want %s", v.HeadPath, vol.HeadPath)
	}
	g.start()
}

// TestSnapshotStoreHeadLibvirtFails makes libvirt fail the snapshot (the
// store's prepared head vanishes while the guest is frozen): the store is
// as it was (same head, no snapshot, no file left over) and the guest,
// thawed, writes on to its old head.
func TestSnapshotStoreHeadLibvirtFails(t *testing.T) {
	g, p, store := storeGuest(t)
	ctx := testCtx(t)
	layers := filepath.Dir(g.disks["vdb"])
	before, _ := filepath.Glob(filepath.Join(layers, "*"))
	testHookFrozen = func() {
		now, _ := filepath.Glob(filepath.Join(layers, "*"))
		for _, f := range now {
			if !slices.Contains(before, f) {
				os.Remove(f)
			}
		}
	}
	defer func() { testHookFrozen = nil }()

	if _, err := p.SnapshotDisks(ctx, g.name, "s1", SnapshotOptions{}); err == nil {
		t.Fatal("the snapshot succeeded without its overlay")
	}
	vol, err := store.Volume(ctx, "data")
	if err != nil {
		t.Fatal(err)
	}
	if snaps, _ := store.ListSnapshots(ctx, "data"); vol.HeadPath != g.disks["vdb"] || len(snaps) != 0 {
		t.Errorf("after the failure: head %s (want %s), %d snapshots", vol.HeadPath, g.disks["vdb"], len(snaps))
	}
	if after, _ := filepath.Glob(filepath.Join(layers, "*")); !slices.Equal(after, before) {
		t.Errorf("files left in the store: %v, before %v", after, before)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(layers), "external", "data.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("intent left: %v", err)
	}
	if st := g.freezeStatus(30 * time.Second); st != "thawed" {
		t.Errorf("after the failed snapshot the guest is %s", st)
	}
	xml, _ := g.dom.GetXMLDesc(0)
	if !strings.Contains(xml, "'"+g.disks["vdb"]+"'") {
		t.Errorf("the domain left the store's head %s", g.disks["vdb"])
	}
	g.waitHeartbeats(3, time.Minute)
}

// fileSize returns the size of a file.
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
