//go:build ceph && cgo

package rbdio

import (
	"errors"
	"testing"

	"snapfs/snapshot"
)

// TestSnapshotExists checks SnapshotExists, which reads the image's RADOS
// objects, against Snapshot, which lists the snapshots through librbd: on
// a flat image and a clone, for snapshots made here and by the rbd tool,
// deleted (also while open, when the snapshot is only hidden), recreated,
// and for names that are not there.
func TestSnapshotExists(t *testing.T) {
	p, c := pool(), ctx(t)
	vol := base(t, p) // snapshot "base"
	clone := cloneOf(t, p, vol, "base", "exists-clone").Name
	snap(t, p, clone, "c1")
	cli(t, "rbd", "snap", "create", "--no-progress", p.spec(clone)+"@outside")

	check := func(volume, name string, want bool) {
		t.Helper()
		err := p.SnapshotExists(c, volume, name)
		_, oracle := p.Snapshot(c, volume, name)
		switch {
		case want && err != nil:
			t.Errorf("SnapshotExists(%s, %s) = %v, want nil", volume, name, err)
		case !want && !errors.Is(err, snapshot.ErrNotFound):
			t.Errorf("SnapshotExists(%s, %s) = %v, want ErrNotFound", volume, name, err)
		}
		if (err == nil) != (oracle == nil) {
			t.Errorf("SnapshotExists(%s, %s) = %v, but Snapshot gives %v", volume, name, err, oracle)
		}
	}
	// The answer comes from the objects, not from the fallback.
	if found, err := snapshotInHeader(p.ioctx, clone, "outside"); !found || err != nil {
		t.Errorf("snapshotInHeader(%s, outside) = %v, %v; want true, nil", clone, found, err)
	}
	check(vol, "base", true)
	check(clone, "c1", true)
	check(clone, "outside", true)
	check(clone, "base", false) // the parent's, not the clone's
	check(vol, "nope", false)
	check("no-such-volume", "base", false)
	check(vol, "../base", false)

	// Deleted while open: hidden until closed, and not found meanwhile.
	im, err := p.OpenSnapshot(c, clone, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(c, clone, "c1"); err != nil {
		t.Fatal(err)
	}
	check(clone, "c1", false)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	check(clone, "c1", false)
	// Recreated under the same name: found again.
	snap(t, p, clone, "c1")
	check(clone, "c1", true)
	cli(t, "rbd", "snap", "rm", "--no-progress", p.spec(clone)+"@outside")
	check(clone, "outside", false)
}

// TestDecodeString checks the decoding of Ceph strings on values that do
// not hold one.
func TestDecodeString(t *testing.T) {
	for _, b := range [][]byte{nil, {1, 0, 0}, {5, 0, 0, 0, 'a'}, {0xff, 0xff, 0xff, 0xff}} {
		if _, _, ok := decodeString(b); ok {
			t.Errorf("decodeString(%v) accepted", b)
		}
	}
	s, rest, ok := decodeString([]byte{2, 0, 0, 0, 'i', 'd', 9})
	if !ok || s != "id" || len(rest) != 1 {
		t.Errorf("decodeString = %q, %v, %v", s, rest, ok)
	}
	if _, ok := snapNameOf([]byte{8, 1, 0, 0}); ok {
		t.Errorf("snapNameOf accepted a short value")
	}
}
