//go:build libvirt && cgo

package virt

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"snapfs/snapshot"
)

// TestQuiescedSnapshotIsClean is the promise of mkdir on a running
// instance: a guest writing continuously to two ext4 disks, snapshotted
// by SnapshotDisks, gives filesystems whose journals need no recovery,
// while a snapshot taken without the freeze catches them in use. The guest
// is thawed and writes on, and snapfs reads the snapshots exactly as
// qemu-img does.
func TestQuiescedSnapshotIsClean(t *testing.T) {
	g := newGuest(t, 2)
	p := testProvider(t, Config{})
	ctx := testCtx(t)

	plain, err := p.SnapshotDisks(ctx, g.name, "plain", SnapshotOptions{NoFreeze: true})
	if err != nil {
		t.Fatal(err)
	}
	if plain.Consistency != snapshot.CrashConsistent || plain.Frozen != 0 || plain.Why == "" {
		t.Errorf("unfrozen snapshot: consistency %s, frozen %v, why %q", plain.Consistency, plain.Frozen, plain.Why)
	}
	g.waitHeartbeats(3, time.Minute)

	quiesced, err := p.SnapshotDisks(ctx, g.name, "quiesced", SnapshotOptions{Metadata: map[string]string{"by": "test"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("quiesced snapshot: frozen for %v", quiesced.Frozen)
	if quiesced.Consistency != snapshot.Quiesced || quiesced.Why != "" {
		t.Errorf("frozen snapshot: consistency %s (%s)", quiesced.Consistency, quiesced.Why)
	}
	if quiesced.Frozen <= 0 || quiesced.Frozen > DefaultFreezeTimeout {
		t.Errorf("frozen window %v", quiesced.Frozen)
	}
	// Thawed: the guest writes on.
	if st := g.freezeStatus(30 * time.Second); st != "thawed" {
		t.Errorf("after the snapshot the guest is %s", st)
	}
	g.waitHeartbeats(3, time.Minute)

	for _, dev := range []string{"vdb", "vdc"} {
		// The first snapshot's layer is the disk as the guest started
		// with it; the second's, the overlay qemu wrote to in between.
		if got := plain.Layers()[dev]; got != g.disks[dev] {
			t.Errorf("%s: the unfrozen snapshot's layer is %s, want %s", dev, got, g.disks[dev])
		}
		if d := quiesced.disk(dev); d.Layer != plain.disk(dev).Overlay {
			t.Errorf("%s: the quiesced snapshot's layer is %s, want the first overlay %s", dev, d.Layer, plain.disk(dev).Overlay)
		}
		raw := rawOf(t, plain.Layers()[dev])
		if needsRecovery, _ := ext4State(t, raw); !needsRecovery {
			t.Errorf("%s: the unfrozen snapshot's ext4 needs no recovery: the test proves nothing", dev)
		}
		raw = rawOf(t, quiesced.Layers()[dev])
		needsRecovery, clean := ext4State(t, raw)
		if needsRecovery || !clean {
			t.Errorf("%s: quiesced snapshot: needs_recovery %v, e2fsck -fn clean %v", dev, needsRecovery, clean)
		}
		img, err := p.OpenDiskSnapshot(ctx, g.name, "quiesced", dev)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := sha256Image(t, img), sha256File(t, raw); got != want {
			t.Errorf("%s: snapfs reads %s, qemu-img %s", dev, got, want)
		}
		img.Close()
	}

	// The generic view: both snapshots, oldest first, with the device
	// mapping; the record keeps the domain XML that names the layers.
	list, err := p.ListInstanceSnapshots(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range list {
		names = append(names, s.Name+"="+string(s.Consistency))
	}
	if want := []string{"plain=crash-consistent", "quiesced=quiesced"}; !slices.Equal(names, want) {
		t.Errorf("snapshots %v, want %v", names, want)
	}
	if got := list[1].Disks; len(got) != 2 || got[0].Device != "vdb" || got[1].Device != "vdc" || got[0].Volume != quiesced.Layers()["vdb"] {
		t.Errorf("device mapping %+v", got)
	}
	if !strings.Contains(quiesced.DomainXML, quiesced.Layers()["vdc"]) || list[1].Metadata["by"] != "test" {
		t.Errorf("the record lacks the domain XML naming the layers, or the metadata")
	}
	if _, err := p.SnapshotDisks(ctx, g.name, "quiesced", SnapshotOptions{}); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("same name again: %v, want ErrExists", err)
	}
}
