//go:build libvirt && cgo

package virt

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/snapshot"
)

// recordNames lists the names of a domain's snapshot records.
func recordNames(t *testing.T, p *Provider, domain string) []string {
	t.Helper()
	recs, err := p.Records(testCtx(t), domain)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range recs {
		names = append(names, r.Name)
	}
	return names
}

// exportHash returns the hash of what qemu-img reads of a snapshot's disk.
func exportHash(t *testing.T, p *Provider, domain, name, dev string) string {
	t.Helper()
	r, err := p.Record(testCtx(t), domain, name)
	if err != nil {
		t.Fatal(err)
	}
	return sha256File(t, rawOf(t, r.Layers()[dev]))
}

// activeFile returns the file a domain's disk dev uses (live XML, or the
// definition with inactive).
func (g *guest) activeFile(dev string, inactive bool) string {
	g.t.Helper()
	var flags libvirt.DomainXMLFlags
	if inactive {
		flags = libvirt.DOMAIN_XML_INACTIVE
	}
	doc, err := g.dom.GetXMLDesc(flags)
	if err != nil {
		g.t.Fatal(err)
	}
	_, disks, err := parseDomainXML(doc)
	if err != nil {
		g.t.Fatal(err)
	}
	for _, d := range disks {
		if d.Device == dev {
			return d.Path
		}
	}
	g.t.Fatalf("no disk %s", dev)
	return ""
}

// TestDeleteOnRunningDomain deletes snapshots from the chain of a running
// guest that keeps writing: a middle one (block commit of the next layer
// into its layer) and the newest (active block commit and pivot). Every
// other snapshot reads exactly as before, the merged files go, and the
// guest runs on, from the merged layer.
func TestDeleteOnRunningDomain(t *testing.T) {
	g := newGuest(t, 1)
	p := testProvider(t, Config{})
	ctx := testCtx(t)

	hash := map[string]string{}
	for _, name := range []string{"s1", "s2", "s3"} {
		g.waitHeartbeats(3, time.Minute)
		if _, err := p.SnapshotDisks(ctx, g.name, name, SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		hash[name] = exportHash(t, p, g.name, name, "vdb")
	}
	s2, _ := p.Record(ctx, g.name, "s2")
	s3, _ := p.Record(ctx, g.name, "s3")

	// Middle: s3's layer is committed into s2's, which becomes s3's.
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "s2"); err != nil {
		t.Fatal(err)
	}
	if got := recordNames(t, p, g.name); !slices.Equal(got, []string{"s1", "s3"}) {
		t.Errorf("after deleting s2: %v", got)
	}
	if r, _ := p.Record(ctx, g.name, "s3"); r.Layers()["vdb"] != s2.Layers()["vdb"] {
		t.Errorf("s3's layer is %s, want s2's %s", r.Layers()["vdb"], s2.Layers()["vdb"])
	}
	if _, err := os.Stat(s3.Layers()["vdb"]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("s3's old layer is still there: %v", err)
	}
	for _, name := range []string{"s1", "s3"} {
		if got := exportHash(t, p, g.name, name, "vdb"); got != hash[name] {
			t.Errorf("%s changed when s2 was deleted", name)
		}
	}
	g.waitHeartbeats(3, time.Minute)

	// Newest: the active overlay is committed into s3's layer, and qemu
	// pivots to it.
	overlay := g.activeFile("vdb", false)
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "s3"); err != nil {
		t.Fatal(err)
	}
	if got := recordNames(t, p, g.name); !slices.Equal(got, []string{"s1"}) {
		t.Errorf("after deleting s3: %v", got)
	}
	if got, want := g.activeFile("vdb", false), s2.Layers()["vdb"]; got != want {
		t.Errorf("qemu writes to %s, want the merged layer %s", got, want)
	}
	if got, want := g.activeFile("vdb", true), s2.Layers()["vdb"]; got != want {
		t.Errorf("the definition names %s, want %s", got, want)
	}
	if _, err := os.Stat(overlay); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the old overlay is still there: %v", err)
	}
	if got := exportHash(t, p, g.name, "s1", "vdb"); got != hash["s1"] {
		t.Error("s1 changed when s3 was deleted")
	}
	g.waitHeartbeats(3, time.Minute)
	if _, err := p.SnapshotDisks(ctx, g.name, "s4", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-U", g.activeFile("vdb", false))

	if err := p.DeleteInstanceSnapshot(ctx, g.name, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("unknown snapshot: %v", err)
	}
}

// TestRevertAndMemory: a memory snapshot restores the guest running where
// it was (no second boot); a disk-only snapshot reverts the disks of the
// shut-off domain, which then boots from them. Reverting a running domain
// is refused.
func TestRevertAndMemory(t *testing.T) {
	g := newGuest(t, 1)
	p := testProvider(t, Config{})
	ctx := testCtx(t)

	disk, err := p.SnapshotDisks(ctx, g.name, "disk", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	diskHash := exportHash(t, p, g.name, "disk", "vdb")
	g.waitHeartbeats(3, time.Minute)
	mem, err := p.SnapshotDisks(ctx, g.name, "mem", SnapshotOptions{Memory: true})
	if err != nil {
		t.Fatal(err)
	}
	if mem.Memory == "" || mem.Consistency != snapshot.CrashConsistent || mem.Frozen != 0 {
		t.Errorf("memory snapshot: memory %q, %s, frozen %v", mem.Memory, mem.Consistency, mem.Frozen)
	}
	if fi, err := os.Stat(mem.Memory); err != nil || fi.Size() < 1<<20 {
		t.Fatalf("memory file: %v", err)
	}
	g.waitHeartbeats(3, time.Minute)

	if err := p.Revert(ctx, g.name, "disk"); !errors.Is(err, snapshot.ErrBusy) {
		t.Fatalf("revert of a running domain: %v, want ErrBusy", err)
	}
	boots := strings.Count(readFile(t, g.console), "GUEST: starting qemu-ga")
	if err := g.dom.Destroy(); err != nil {
		t.Fatal(err)
	}

	if err := p.Revert(ctx, g.name, "mem"); err != nil {
		t.Fatal(err)
	}
	if active, _ := g.dom.IsActive(); !active {
		t.Fatal("the memory revert left the domain off")
	}
	g.waitAgent(time.Minute)
	g.waitHeartbeats(3, time.Minute)
	if got := strings.Count(readFile(t, g.console), "GUEST: starting qemu-ga"); got != boots {
		t.Errorf("the guest booted again (%d boots, want %d): the memory was not restored", got, boots)
	}
	if got := g.activeFile("vdb", false); got == mem.Layers()["vdb"] || got == mem.disk("vdb").Overlay {
		t.Errorf("the restored guest writes to %s, a file of the snapshot", got)
	}
	if err := g.dom.Destroy(); err != nil {
		t.Fatal(err)
	}

	if err := p.Revert(ctx, g.name, "disk"); err != nil {
		t.Fatal(err)
	}
	reverted := g.activeFile("vdb", true)
	if b, err := backingFile(reverted); err != nil || b != disk.Layers()["vdb"] {
		t.Errorf("the reverted disk %s sits on %q (%v), want %s", reverted, b, err, disk.Layers()["vdb"])
	}
	if got := sha256File(t, rawOf(t, reverted)); got != diskHash {
		t.Error("the reverted disk does not read as the snapshot")
	}
	g.start()
	if got := recordNames(t, p, g.name); !slices.Equal(got, []string{"disk", "mem"}) {
		t.Errorf("records after the reverts: %v", got)
	}
	// The disk snapshot's layer now has two children: the mem snapshot's
	// layer and the reverted disk. It cannot be merged with either.
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "disk"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete of a layer with two children: %v, want ErrBusy", err)
	}
	if got := recordNames(t, p, g.name); !slices.Equal(got, []string{"disk", "mem"}) {
		t.Errorf("records after a refused delete: %v", got)
	}
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "mem"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mem.Memory); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the memory file outlived its snapshot: %v", err)
	}
	// Now the reverted disk is the only child: merged into the layer
	// under the running guest.
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "disk"); err != nil {
		t.Fatal(err)
	}
	if got := g.activeFile("vdb", false); got != disk.Layers()["vdb"] {
		t.Errorf("after the last delete the guest writes to %s, want %s", got, disk.Layers()["vdb"])
	}
	g.waitHeartbeats(3, time.Minute)
}

// TestShutoffDomain: a stopped domain's disks are snapshotted with no
// agent, and its snapshots deleted with qemu-img (nothing runs); it then
// boots from the merged files.
func TestShutoffDomain(t *testing.T) {
	g := newGuest(t, 2)
	p := testProvider(t, Config{})
	ctx := testCtx(t)
	if err := g.dom.Shutdown(); err != nil {
		// The guest has no ACPI power button handler: destroy.
		t.Logf("shutdown: %v", err)
	}
	g.dom.Destroy()

	off, err := p.SnapshotDisks(ctx, g.name, "off", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if off.State != "shutoff" || off.Consistency != snapshot.CrashConsistent || off.Frozen != 0 {
		t.Errorf("snapshot of a shut-off domain: %s, %s, frozen %v", off.State, off.Consistency, off.Frozen)
	}
	if got := g.activeFile("vdb", true); got != off.disk("vdb").Overlay || off.Layers()["vdb"] != g.disks["vdb"] {
		t.Errorf("the definition names %s; the snapshot's layer is %s", got, off.Layers()["vdb"])
	}
	off2, err := p.SnapshotDisks(ctx, g.name, "off2", SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h2 := exportHash(t, p, g.name, "off2", "vdc")

	if err := p.DeleteInstanceSnapshot(ctx, g.name, "off"); err != nil {
		t.Fatal(err)
	}
	if got := exportHash(t, p, g.name, "off2", "vdc"); got != h2 {
		t.Error("off2 changed when off was deleted")
	}
	if err := p.DeleteInstanceSnapshot(ctx, g.name, "off2"); err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"vdb", "vdc"} {
		if got := g.activeFile(dev, true); got != g.disks[dev] {
			t.Errorf("%s: the definition names %s, want the merged %s", dev, got, g.disks[dev])
		}
		if _, err := os.Stat(off2.disk(dev).Overlay); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: the last overlay is still there", dev)
		}
	}
	g.start()
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
