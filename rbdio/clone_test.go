//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// protected reports whether rbd says spec (POOL/IMAGE@SNAP) is protected.
func protected(t *testing.T, spec string) bool {
	t.Helper()
	image, snapName, _ := strings.Cut(spec, "@")
	var snaps []struct {
		Name      string `json:"name"`
		Protected string `json:"protected"`
	}
	if err := json.Unmarshal(cli(t, "rbd", "snap", "ls", "--format", "json", image), &snaps); err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if s.Name == snapName {
			return s.Protected == "true"
		}
	}
	t.Fatalf("%s: no such snapshot", spec)
	return false
}

// base makes a volume of 16 MiB with data in objects 0-2 and a snapshot
// "base" of it, and returns its name.
func base(t *testing.T, p *Pool) string {
	t.Helper()
	name := uniqueName(t, "base")
	if _, err := p.CreateVolume(ctx(t), name, 16<<20); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.DeleteVolume(ctx(t), name) })
	w := writer(t, name)
	writeAt(t, w, randomBytes(12<<20), 0)
	snap(t, p, name, "base")
	writeAt(t, w, randomBytes(1<<20), 0) // the head moves on; the clone must not see it
	return name
}

// cloneOf clones vol@snapName as a new volume deleted at the end.
func cloneOf(t *testing.T, p *Pool, vol, snapName, what string) snapshot.Volume {
	t.Helper()
	name := uniqueName(t, what)
	v, err := p.Clone(ctx(t), vol, snapName, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.DeleteVolume(ctx(t), name) })
	return v
}

func TestCloneFlatten(t *testing.T) {
	p, c := pool(), ctx(t)
	vol := base(t, p)
	// A fresh pacific cluster admits pre-mimic clients: format 1, from a
	// protected snapshot.
	cli(t, "ceph", "osd", "set-require-min-compat-client", "luminous")
	clone := cloneOf(t, p, vol, "base", "clone")
	if clone.Parent == nil || *clone.Parent != (snapshot.SnapshotRef{Volume: vol, Snapshot: "base"}) ||
		len(clone.Chain) != 2 || clone.Chain[1] != "rbd:rbd/"+vol+"@base" {
		t.Errorf("clone: parent %+v chain %v", clone.Parent, clone.Chain)
	}
	if !protected(t, "rbd/"+vol+"@base") {
		t.Errorf("format 1 clone from an unprotected snapshot")
	}
	if _, err := p.Clone(c, vol, "base", clone.Name); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("clone onto an existing name: %v, want ErrExists", err)
	}
	if _, err := p.Clone(c, vol, "nope", uniqueName(t, "x")); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("clone of a missing snapshot: %v, want ErrNotFound", err)
	}

	// The clone reads through its parent until written.
	head, err := p.OpenHead(c, clone.Name)
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, head, "rbd/"+vol+"@base")
	head.Close()
	w := writer(t, clone.Name)
	writeAt(t, w, randomBytes(4096), 5<<20) // object 1 becomes the clone's
	snap(t, p, clone.Name, "c1")
	im, err := p.OpenSnapshot(c, clone.Name, "c1")
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, im, "rbd/"+clone.Name+"@c1")
	ext, err := im.Extents(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []qcow.Extent{
		{Offset: 0, Length: 4 << 20, Kind: qcow.Data, Layer: 1},
		{Offset: 4 << 20, Length: 4 << 20, Kind: qcow.Data, Layer: 0},
		{Offset: 8 << 20, Length: 4 << 20, Kind: qcow.Data, Layer: 1},
		{Offset: 12 << 20, Length: 4 << 20, Kind: qcow.Unallocated, Layer: 2},
	}
	if !equalExtents(ext, want) {
		t.Errorf("clone extents %v, want %v", ext, want)
	}
	im.Close()

	// The parent snapshot cannot go, nor its volume, while the clone
	// lives; the errors name the clone.
	err = p.DeleteSnapshot(c, vol, "base")
	if !errors.Is(err, snapshot.ErrBusy) || !strings.Contains(err.Error(), clone.Name) {
		t.Errorf("delete a cloned snapshot: %v, want ErrBusy naming %s", err, clone.Name)
	}
	if err := p.DeleteVolume(c, vol); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete a cloned volume: %v, want ErrBusy", err)
	}

	// Flatten, with progress; then the clone stands alone, reads the
	// same, and the snapshot can go (unprotected first).
	before := rbdExport(t, "rbd/"+clone.Name)
	var mu sync.Mutex
	var calls, lastDone, lastTotal int64
	err = p.Flatten(snapshot.WithProgress(c, func(done, total int64) {
		mu.Lock()
		calls++
		lastDone, lastTotal = done, total
		mu.Unlock()
	}), clone.Name)
	if err != nil {
		t.Fatal(err)
	}
	if calls == 0 || lastDone != lastTotal || lastTotal == 0 {
		t.Errorf("flatten progress: %d calls, last %d/%d", calls, lastDone, lastTotal)
	}
	v, err := p.Volume(c, clone.Name)
	if err != nil || v.Parent != nil || len(v.Chain) != 1 {
		t.Errorf("flattened clone: %+v, %v", v, err)
	}
	if got := rbdExport(t, "rbd/"+clone.Name); !bytes.Equal(got, before) {
		t.Errorf("flatten changed the clone's content")
	}
	im, err = p.OpenSnapshot(c, clone.Name, "c1")
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, im, "rbd/"+clone.Name+"@c1")
	im.Close()
	if err := p.Flatten(c, clone.Name); err != nil {
		t.Errorf("flatten a flat volume: %v", err)
	}
	if err := p.DeleteSnapshot(c, vol, "base"); err != nil {
		t.Errorf("delete the snapshot of a flattened clone: %v", err)
	}

	// Once the cluster requires mimic clients, clones are format 2: no
	// protection; the snapshot still cannot go while a clone needs it.
	cli(t, "ceph", "osd", "set-require-min-compat-client", "mimic")
	snap(t, p, vol, "v2")
	clone2 := cloneOf(t, p, vol, "v2", "clone2")
	if protected(t, "rbd/"+vol+"@v2") {
		t.Errorf("format 2 clone protected its snapshot")
	}
	head, err = p.OpenHead(c, clone2.Name)
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, head, "rbd/"+vol+"@v2")
	head.Close()
	if err := p.DeleteSnapshot(c, vol, "v2"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete the snapshot of a v2 clone: %v, want ErrBusy", err)
	}
	if err := p.DeleteVolume(c, clone2.Name); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(c, vol, "v2"); err != nil {
		t.Errorf("delete the snapshot once its clone is gone: %v", err)
	}
}

func equalExtents(a, b []qcow.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestCloneChain(t *testing.T) {
	p, c := pool(), ctx(t)
	cli(t, "ceph", "osd", "set-require-min-compat-client", "mimic")
	vol := base(t, p)
	// Depth 8: each clone writes one 64 KiB block of its own object (a
	// different one each time, some twice), then is snapped and cloned.
	parent, parentSnap := vol, "base"
	for i := range 8 {
		cl := cloneOf(t, p, parent, parentSnap, "chain")
		w := writer(t, cl.Name)
		writeAt(t, w, randomBytes(64<<10), int64(i%4)<<22+int64(i)<<16)
		snap(t, p, cl.Name, "s")
		parent, parentSnap = cl.Name, "s"
	}
	im, err := p.OpenSnapshot(c, parent, parentSnap)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if d := im.(*image).Depth(); d != 9 {
		t.Errorf("depth %d, want 9", d)
	}
	checkExport(t, im, "rbd/"+parent+"@s")
	ext, err := im.Extents(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	// The last clone wrote object 3 (i=7), and i=6 object 2, i=5 object
	// 1, i=4 object 0: each object is owned by the newest clone that
	// wrote it. Object 3 of 16 MiB: none of the base.
	want := []qcow.Extent{
		{Offset: 0, Length: 4 << 20, Kind: qcow.Data, Layer: 3},
		{Offset: 4 << 20, Length: 4 << 20, Kind: qcow.Data, Layer: 2},
		{Offset: 8 << 20, Length: 4 << 20, Kind: qcow.Data, Layer: 1},
		{Offset: 12 << 20, Length: 4 << 20, Kind: qcow.Data, Layer: 0},
	}
	if !equalExtents(ext, want) {
		t.Errorf("chain extents %v, want %v", ext, want)
	}
	// The head of the last clone reads the same through librbd.
	head, err := p.OpenHead(c, parent)
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, head, "rbd/"+parent+"@s")
	head.Close()
}

func TestRevert(t *testing.T) {
	p, c := pool(), ctx(t)
	name := history(t, p)
	// history left a writer open: revert refuses to roll back under it.
	if err := p.Revert(c, name, "s1"); !errors.Is(err, snapshot.ErrBusy) {
		t.Fatalf("revert under a writer: %v, want ErrBusy", err)
	}
	other := uniqueName(t, "rev")
	if _, err := p.CreateVolume(c, other, 8<<20); err != nil {
		t.Fatal(err)
	}
	defer p.DeleteVolume(c, other)
	w := writer(t, other)
	first := randomBytes(8 << 20)
	writeAt(t, w, first, 0)
	w.Close() // the "VM" stops
	snap(t, p, other, "good")
	w = writer(t, other)
	writeAt(t, w, randomBytes(3<<20), 1<<20)
	w.Close()
	snap(t, p, other, "later")
	var mu sync.Mutex
	var calls int
	rc := snapshot.WithProgress(c, func(done, total int64) {
		mu.Lock()
		calls++
		mu.Unlock()
	})
	if err := p.Revert(rc, other, "good"); err != nil {
		t.Fatal(err)
	}
	if got := rbdExport(t, "rbd/"+other); !bytes.Equal(got, first) {
		t.Errorf("head after revert differs from the snapshot")
	}
	if snaps, _ := p.ListSnapshots(c, other); len(snaps) != 2 {
		t.Errorf("revert lost snapshots: %+v", snaps)
	}
	if calls == 0 {
		t.Errorf("no progress during revert")
	}
	if err := p.Revert(c, other, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("revert to a missing snapshot: %v, want ErrNotFound", err)
	}

	// A revert interrupted (the record is there, the rollback is not
	// done) is finished by the next reader of the head.
	w = writer(t, other)
	writeAt(t, w, randomBytes(1<<20), 0)
	w.Close()
	img, err := p.openImage(other, "", true)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := img.GetId()
	sid, _ := img.GetSnapID("good")
	if err := setMeta(img, metaRevertKey, revertMeta{Image: id, Snapshot: "good", SnapID: sid}); err != nil {
		t.Fatal(err)
	}
	img.Close()
	head, err := p.OpenHead(c, other)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, head, 1<<20); !bytes.Equal(got, first) {
		t.Errorf("the interrupted revert was not finished before the head was read")
	}
	head.Close()
	img, _ = p.openImage(other, "", false)
	if meta, _ := readMeta(img, id); meta.revert != nil {
		t.Errorf("revert record left: %+v", meta.revert)
	}
	img.Close()
}

func TestCloneAcrossPools(t *testing.T) {
	c := ctx(t)
	other := tempPool(t, "snapfs-pool")
	cl, err := Open(Config{CephConf: cephConf, Pools: []string{testPool, other}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() }) // after the cleanups of base
	p, q := cl.Pools()[0], cl.Pools()[1]
	if q.Name() != "rbd:"+other || cl.Pool(other) != q {
		t.Errorf("pool %q, lookup %v", q.Name(), cl.Pool(other))
	}
	vol := base(t, p)
	name := uniqueName(t, "xpool")
	v, err := p.CloneInto(c, vol, "base", q, name)
	if err != nil {
		t.Fatal(err)
	}
	defer q.DeleteVolume(c, name)
	// The parent is in another pool: named POOL/IMAGE.
	if v.Parent == nil || v.Parent.Volume != testPool+"/"+vol || v.Parent.Snapshot != "base" {
		t.Errorf("cross-pool clone parent %+v", v.Parent)
	}
	head, err := q.OpenHead(c, name)
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, head, "rbd/"+vol+"@base")
	head.Close()
	if err := p.DeleteSnapshot(c, vol, "base"); !errors.Is(err, snapshot.ErrBusy) || !strings.Contains(err.Error(), other+"/"+name) {
		t.Errorf("delete a snapshot cloned into another pool: %v, want ErrBusy naming %s/%s", err, other, name)
	}
	if list, err := q.ListVolumes(c); err != nil || len(list) != 1 || list[0].Name != name {
		t.Errorf("volumes of %s: %+v, %v", other, list, err)
	}

	// CloneFrom, the mount's way in: the same clone, asked of the
	// destination; from any backend but a pool of the cluster, refused.
	name2 := uniqueName(t, "xfrom")
	v, err = q.CloneFrom(c, p, vol, "base", name2)
	if err != nil {
		t.Fatal(err)
	}
	defer q.DeleteVolume(c, name2)
	if v.Parent == nil || v.Parent.Volume != testPool+"/"+vol || v.Parent.Snapshot != "base" {
		t.Errorf("CloneFrom: parent %+v", v.Parent)
	}
	local, err := snapshot.OpenLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	if _, err := q.CloneFrom(c, local, vol, "base", "nope"); !errors.Is(err, snapshot.ErrUnsupported) {
		t.Errorf("CloneFrom the local store: %v, want ErrUnsupported", err)
	}
	if _, err := q.Volume(c, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("a refused CloneFrom left a volume: %v", err)
	}
}

func TestDeleteVolumeWithSnapshots(t *testing.T) {
	p, c := pool(), ctx(t)
	name := history(t, p) // s1, s2, a writer
	if err := p.DeleteVolume(c, name); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete with a writer: %v, want ErrBusy", err)
	}
	// BytesUsed counts the snapshots' objects too, as rbd du does.
	v, err := p.Volume(c, name)
	if err != nil {
		t.Fatal(err)
	}
	if du := rbdDu(t, "rbd/"+name); v.BytesUsed != du {
		t.Errorf("BytesUsed %d, rbd du %d", v.BytesUsed, du)
	}
	other := uniqueName(t, "delsnaps")
	if _, err := p.CreateVolume(c, other, 4<<20); err != nil {
		t.Fatal(err)
	}
	snap(t, p, other, "a")
	snap(t, p, other, "b")
	cli(t, "rbd", "snap", "protect", "rbd/"+other+"@a")
	if err := p.DeleteVolume(c, other); err != nil {
		t.Fatalf("delete a volume with a protected snapshot: %v", err)
	}
	if _, err := p.Volume(c, other); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

// TestCloneFailureUnprotects: a format-1 clone protects its snapshot
// first; when the clone then fails (here: the client may only read the
// destination pool), the snapshot is unprotected again, as it was, so that
// rbd snap rm still works, and no volume appears.
func TestCloneFailureUnprotects(t *testing.T) {
	c := ctx(t)
	cli(t, "ceph", "osd", "set-require-min-compat-client", "luminous")
	other := tempPool(t, "snapfs-ro")
	id := uniqueName(t, "reader")
	keyring := filepath.Join(t.TempDir(), "keyring")
	cli(t, "ceph", "auth", "get-or-create", "client."+id, "mon", "profile rbd",
		"osd", "profile rbd pool="+testPool+", profile rbd-read-only pool="+other, "-o", keyring)
	t.Cleanup(func() { cli(t, "ceph", "auth", "del", "client."+id) })
	cl, err := Open(Config{CephConf: cephConf, ID: id, Keyring: keyring, Pools: []string{testPool, other}, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() }) // after the cleanups of base
	p, q := cl.Pools()[0], cl.Pools()[1]
	vol := base(t, p)
	name := uniqueName(t, "refused")
	if _, err := p.CloneInto(c, vol, "base", q, name); err == nil {
		q.DeleteVolume(c, name)
		t.Fatal("a clone into a pool the client may only read succeeded")
	} else {
		t.Logf("refused as it should be: %v", err)
	}
	if protected(t, testPool+"/"+vol+"@base") {
		t.Errorf("the snapshot stayed protected after the failed clone")
	}
	if _, err := q.Volume(c, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("the failed clone left a volume: %v", err)
	}
}
