package snapshot

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"snapfs/qcow"
)

// ownProvider is a provider with the optional interfaces of
// instance_ext.go, over a local store: it snapshots on its own (and fails
// the test if Manager freezes it as well) and reads its disks itself.
type ownProvider struct {
	*LocalStore
	t        *testing.T
	snaps    int
	opened   int
	reverted []string
}

func (p *ownProvider) Freeze(context.Context, string) (func(context.Context) error, error) {
	p.t.Error("Manager froze a provider that snapshots consistently on its own")
	return nil, ErrUnsupported
}

func (p *ownProvider) SnapshotInstance(ctx context.Context, instance, name string, meta map[string]string) (InstanceSnapshot, error) {
	p.snaps++
	return p.CreateInstanceSnapshot(ctx, instance, name, InstanceSnapshotOptions{Consistency: Quiesced, Metadata: meta})
}

func (p *ownProvider) OpenDiskSnapshot(ctx context.Context, instance, name, device string) (qcow.Image, error) {
	p.opened++
	s, err := p.InstanceSnapshot(ctx, instance, name)
	if err != nil {
		return nil, err
	}
	for _, d := range s.Disks {
		if d.Device == device {
			return p.OpenSnapshot(ctx, d.Volume, d.Snapshot)
		}
	}
	return nil, fmt.Errorf("%w: disk %s", ErrNotFound, device)
}

func (p *ownProvider) RevertInstance(ctx context.Context, instance, name string) error {
	p.reverted = append(p.reverted, instance+"@"+name)
	return nil
}

// TestMergedInstances: instances of two providers under one name space,
// the first winning a clash (logged once); each call, the optional ones
// included, goes to the instance's own provider, and Manager uses the
// optional interfaces only for the instances whose provider has them.
func TestMergedInstances(t *testing.T) {
	ctx := t.Context()
	a, b := openStore(t), openStore(t)
	for _, s := range []*LocalStore{a, b} {
		if _, err := s.CreateVolume(ctx, "root", 1<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateInstance(ctx, "web", []Disk{{Device: "vda", Volume: "root"}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.CreateInstance(ctx, "db", []Disk{{Device: "vda", Volume: "root"}}); err != nil {
		t.Fatal(err)
	}
	own := &ownProvider{LocalStore: b, t: t}
	var logged []string
	merged := MergeInstances(func(format string, args ...any) { logged = append(logged, fmt.Sprintf(format, args...)) }, a, own)
	for range 2 {
		list, err := merged.ListInstances(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, in := range list {
			names = append(names, in.Name)
		}
		if !slices.Equal(names, []string{"db", "web"}) {
			t.Fatalf("instances %q, want db, web", names)
		}
	}
	if len(logged) != 1 {
		t.Errorf("clash logged %d times, want once: %q", len(logged), logged)
	}
	if _, err := merged.Instance(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown instance: %v, want ErrNotFound", err)
	}

	m := NewManager(a, merged)
	// web is a's: Manager's own sequence, the disks from the backend.
	if s, err := m.SnapshotInstance(ctx, "web", "s1", nil); err != nil || s.Consistency != CrashConsistent {
		t.Fatalf("snapshot of web: %+v, %v", s, err)
	}
	if _, err := a.InstanceSnapshot(ctx, "web", "s1"); err != nil {
		t.Fatalf("web's snapshot is not in its own store: %v", err)
	}
	img, err := m.OpenInstanceDisk(ctx, "web", "s1", "vda")
	if err != nil || img.Size() != 1<<20 {
		t.Fatalf("open web/s1/vda: %v", err)
	}
	img.Close()
	release, err := m.HoldInstanceDisk(ctx, "web", "s1", "vda")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteInstanceSnapshot(ctx, "web", "s1"); !errors.Is(err, ErrBusy) {
		t.Errorf("delete of a held instance snapshot: %v, want ErrBusy", err)
	}
	release()
	if err := m.DeleteInstanceSnapshot(ctx, "web", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.HoldInstanceDisk(ctx, "web", "s1", "vda"); !errors.Is(err, ErrNotFound) {
		t.Errorf("hold of a deleted snapshot: %v, want ErrNotFound", err)
	}
	// The store's volume Revert must not be taken for an instance revert.
	if err := m.RevertInstance(ctx, "web", "s1"); !errors.Is(err, ErrUnsupported) {
		t.Errorf("revert of a store instance: %v, want ErrUnsupported", err)
	}

	// db is own's: its own snapshot, reader and revert.
	if s, err := m.SnapshotInstance(ctx, "db", "s1", nil); err != nil || s.Consistency != Quiesced || own.snaps != 1 {
		t.Fatalf("snapshot of db: %+v, %v (%d own snapshots)", s, err, own.snaps)
	}
	if img, err := m.OpenInstanceDisk(ctx, "db", "s1", "vda"); err != nil || own.opened != 1 {
		t.Fatalf("open db/s1/vda: %v (%d own opens)", err, own.opened)
	} else {
		img.Close()
	}
	info, err := m.InstanceSnapshotInfo(ctx, "db", "s1")
	if err != nil || info.Kind != KindInstanceSnapshot || len(info.Disks) != 1 || info.Disks[0].Size != 1<<20 {
		t.Fatalf("info of db/s1: %+v, %v", info, err)
	}
	if err := m.RevertInstance(ctx, "db", "s1"); err != nil || !slices.Equal(own.reverted, []string{"db@s1"}) {
		t.Fatalf("revert of db: %v, reverted %q", err, own.reverted)
	}
}
