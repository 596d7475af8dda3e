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

	"snapfs/snapshot"
)

// Fast checks on libvirt's test driver, which lists, describes, freezes
// and thaws domains in-process but takes no disk snapshots: listing, disk
// classification, the freeze window, and the RBD path, where the pool's
// backend (here a real local store standing for a Ceph pool: the provider
// sees only the snapshot.Backend interface) takes the disk snapshots.

func testDriver(t *testing.T, cfg Config, uri string) *Provider {
	t.Helper()
	cfg.URI = uri
	cfg.StateDir = t.TempDir()
	p, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestTestDriverInstances(t *testing.T) {
	p := testDriver(t, Config{}, "test:///default")
	ctx := testCtx(t)
	list, err := p.ListInstances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "test" || !list[0].Running || len(list[0].Disks) != 1 ||
		list[0].Disks[0].Device != "vda" || list[0].Disks[0].Volume != "/guest/diskimage1" {
		t.Fatalf("instances: %+v", list)
	}
	disks, err := p.Disks(ctx, "test")
	if err != nil || disks[0].Kind != FileDisk || !disks[0].Snapshot {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	if _, err := p.Instance(ctx, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("unknown domain: %v, want ErrNotFound", err)
	}
	if _, err := p.Instance(ctx, "../x"); !errors.Is(err, snapshot.ErrInvalidName) {
		t.Errorf("bad name: %v, want ErrInvalidName", err)
	}
	if snaps, err := p.ListInstanceSnapshots(ctx, "test"); err != nil || len(snaps) != 0 {
		t.Errorf("snapshots %v, %v", snaps, err)
	}
	thaw, err := p.Freeze(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Freeze(ctx, "test"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("second freeze: %v, want ErrBusy", err)
	}
	if err := thaw(ctx); err != nil {
		t.Fatal(err)
	}
	if err := thaw(ctx); err != nil {
		t.Errorf("second thaw: %v", err)
	}
}

// TestFreezeWindowTimer: a caller that never thaws does not leave the
// guest frozen: the window timer thaws it.
func TestFreezeWindowTimer(t *testing.T) {
	p := testDriver(t, Config{FreezeTimeout: 100 * time.Millisecond}, "test:///default")
	ctx := testCtx(t)
	if _, err := p.Freeze(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.activeFreeze(domainUUID(t, p, "test")) != nil {
		if time.Now().After(deadline) {
			t.Fatal("the window timer did not thaw the guest")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Frozen again at once: the timer's thaw really ended the freeze.
	thaw, err := p.Freeze(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	thaw(ctx)
}

func domainUUID(t *testing.T, p *Provider, name string) string {
	t.Helper()
	dom, uuid, err := p.lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	dom.Free()
	return uuid
}

// rbdNode is a test driver node with a running domain whose disks are RBD
// images of pool "pool1", and a CD-ROM that snapshots leave out.
const rbdNode = `<node>
  <domain type='test'>
    <name>rbdvm</name>
    <uuid>5a3c44a0-2d5b-4a8e-b1a9-7e6f00000001</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='network' device='disk'>
        <driver name='qemu' type='raw'/>
        <source protocol='rbd' name='pool1/root'><host name='127.0.0.1'/></source>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='network' device='disk'>
        <driver name='qemu' type='raw'/>
        <source protocol='rbd' name='pool1/data'><host name='127.0.0.1'/></source>
        <target dev='vdb' bus='virtio'/>
      </disk>
      <disk type='file' device='cdrom'>
        <source file='/iso/x.iso'/>
        <target dev='hdc' bus='ide'/>
        <readonly/>
      </disk>
    </devices>
  </domain>
</node>`

// rbdNodeFixture writes rbdNode for the test driver and opens a store
// holding its pool's volumes, root and data.
func rbdNodeFixture(t *testing.T) (node string, store *snapshot.LocalStore) {
	t.Helper()
	node = filepath.Join(t.TempDir(), "node.xml")
	if err := os.WriteFile(node, []byte(rbdNode), 0o600); err != nil {
		t.Fatal(err)
	}
	store, err := snapshot.OpenLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	for _, v := range []string{"root", "data"} {
		if _, err := store.CreateVolume(testCtx(t), v, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	return node, store
}

func TestRBDDisksThroughPoolBackend(t *testing.T) {
	node, store := rbdNodeFixture(t)
	ctx := testCtx(t)
	uri := "test://" + node

	// Without the pool: listed, not snapshotted.
	p0 := testDriver(t, Config{}, uri)
	if _, err := p0.SnapshotDisks(ctx, "rbdvm", "s", SnapshotOptions{}); !errors.Is(err, snapshot.ErrUnsupported) {
		t.Errorf("RBD disk without its pool: %v, want ErrUnsupported", err)
	}

	p := testDriver(t, Config{Pools: func(pool string) (snapshot.Backend, bool) {
		return store, pool == "pool1"
	}}, uri)
	disks, err := p.Disks(ctx, "rbdvm")
	if err != nil || len(disks) != 3 || disks[0].Kind != RBDDisk || disks[0].Volume != "root" || disks[2].Snapshot {
		t.Fatalf("disks %+v, %v", disks, err)
	}
	rec, err := p.SnapshotDisks(ctx, "rbdvm", "s1", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Consistency != snapshot.Quiesced || len(rec.Disks) != 2 || rec.Layers()["vdb"] != "rbd:pool1/data@s1" {
		t.Errorf("record %+v", rec)
	}
	if _, err := store.Snapshot(ctx, "data", "s1"); err != nil {
		t.Errorf("the pool has no snapshot data@s1: %v", err)
	}
	img, err := p.OpenDiskSnapshot(ctx, "rbdvm", "s1", "vda")
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != 1<<20 {
		t.Errorf("size %d", img.Size())
	}
	img.Close()

	// The generic sequence of snapshot.Manager: Freeze, then
	// CreateInstanceSnapshot, which checks the freeze it finds, then thaw.
	m := snapshot.NewManager(store, p)
	s2, err := m.SnapshotInstance(ctx, "rbdvm", "s2", map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	if s2.Consistency != snapshot.Quiesced || s2.Disks[0].Volume != "root" || s2.Disks[0].Snapshot != "s2" {
		t.Errorf("through Manager: %+v", s2)
	}
	// The thaw wrote the frozen window into the record.
	if r, err := p.Record(ctx, "rbdvm", "s2"); err != nil || r.Frozen <= 0 {
		t.Errorf("frozen window of s2: %v, %v", r.Frozen, err)
	}

	if err := p.DeleteInstanceSnapshot(ctx, "rbdvm", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Snapshot(ctx, "data", "s1"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("data@s1 after the delete: %v", err)
	}
	if names := recordNames(t, p, "rbdvm"); len(names) != 1 || names[0] != "s2" {
		t.Errorf("records %v", names)
	}
}

// TestRequireQuiesceStoppedDomain: RequireQuiesce refuses only a running
// domain that cannot be frozen (as Nova's os_require_quiesce). A paused
// or shut-off domain has nothing writing to its disks and needs no agent:
// its snapshot is taken, crash-consistent, and kept, and the domain is
// left in the state it was in.
func TestRequireQuiesceStoppedDomain(t *testing.T) {
	node, store := rbdNodeFixture(t)
	ctx := testCtx(t)
	p := testDriver(t, Config{RequireQuiesce: true, Pools: func(pool string) (snapshot.Backend, bool) {
		return store, pool == "pool1"
	}}, "test://"+node)
	dom, _, err := p.lookup("rbdvm")
	if err != nil {
		t.Fatal(err)
	}
	defer dom.Free()
	for _, c := range []struct {
		name  string
		state func() error
		why   string
	}{
		{"paused", dom.Suspend, "paused"},
		{"shutoff", dom.Destroy, ""},
	} {
		if err := c.state(); err != nil {
			t.Fatal(err)
		}
		before, _, err := dom.GetState()
		if err != nil {
			t.Fatal(err)
		}
		rec, err := p.SnapshotDisks(ctx, "rbdvm", c.name, SnapshotOptions{})
		if err != nil {
			t.Fatalf("%s domain with RequireQuiesce: %v", c.name, err)
		}
		// Its two RBD disks are taken one by one: a running domain
		// would be paused for them and resumed, one paused already
		// must stay paused.
		if after, _, err := dom.GetState(); err != nil || after != before {
			t.Errorf("%s: the snapshot changed the domain's state from %s to %s (%v)", c.name, stateName(before), stateName(after), err)
		}
		if rec.Consistency != snapshot.CrashConsistent || !strings.Contains(rec.Why, c.why) {
			t.Errorf("%s: %s (%s), want crash-consistent", c.name, rec.Consistency, rec.Why)
		}
		if _, err := store.Snapshot(ctx, "data", c.name); err != nil {
			t.Errorf("%s: the pool has no snapshot data@%s: %v", c.name, c.name, err)
		}
	}
	if names := recordNames(t, p, "rbdvm"); !slices.Equal(names, []string{"paused", "shutoff"}) {
		t.Errorf("records %v", names)
	}
}
