//go:build libvirt && cgo

package virt

import (
	"context"
	"fmt"
	"maps"
	"strings"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// InstanceSnapshot turns a record into the model's instance snapshot. Each
// disk's Volume is what reads it: for an RBD disk the image, a volume of
// its pool's backend (which holds snapshot Name); for a file disk the
// layer file, which no backend knows: open it with
// [Provider.OpenDiskSnapshot].
func (r Record) InstanceSnapshot(instance string) snapshot.InstanceSnapshot {
	s := snapshot.InstanceSnapshot{
		Instance: instance, Name: r.Name, Created: r.Created, Consistency: r.Consistency,
		Frozen: r.Frozen, Metadata: maps.Clone(r.Metadata), Disks: []snapshot.SnapshotDisk{},
	}
	for _, d := range r.Disks {
		vol := d.Layer
		if d.Kind == RBDDisk {
			vol = d.Image
		}
		s.Disks = append(s.Disks, snapshot.SnapshotDisk{Device: d.Device, Volume: vol, Snapshot: r.Name})
	}
	return s
}

// Layers returns the layer of each disk (device -> file, or
// rbd:POOL/IMAGE@SNAP).
func (r Record) Layers() map[string]string {
	out := map[string]string{}
	for _, d := range r.Disks {
		out[d.Device] = d.Layer
	}
	return out
}

// Records returns the records of a domain's snapshots, oldest first.
func (p *Provider) Records(ctx context.Context, instance string) ([]Record, error) {
	dom, uuid, err := p.lookup(instance)
	if err != nil {
		return nil, err
	}
	dom.Free()
	recs, err := p.records.load(uuid)
	if err != nil {
		return nil, err
	}
	out := []Record{}
	for _, r := range recs.Snapshots {
		if !r.Deleting {
			out = append(out, r)
		}
	}
	return out, nil
}

// Record returns the record of one snapshot.
func (p *Provider) Record(ctx context.Context, instance, name string) (Record, error) {
	all, err := p.Records(ctx, instance)
	if err != nil {
		return Record{}, err
	}
	for _, r := range all {
		if r.Name == name {
			return r, nil
		}
	}
	return Record{}, fmt.Errorf("%w: snapshot %q of instance %q", snapshot.ErrNotFound, name, instance)
}

// ListInstanceSnapshots implements [snapshot.InstanceProvider].
func (p *Provider) ListInstanceSnapshots(ctx context.Context, instance string) ([]snapshot.InstanceSnapshot, error) {
	all, err := p.Records(ctx, instance)
	if err != nil {
		return nil, err
	}
	out := make([]snapshot.InstanceSnapshot, 0, len(all))
	for _, r := range all {
		out = append(out, r.InstanceSnapshot(instance))
	}
	return out, nil
}

// InstanceSnapshot implements [snapshot.InstanceProvider].
func (p *Provider) InstanceSnapshot(ctx context.Context, instance, name string) (snapshot.InstanceSnapshot, error) {
	r, err := p.Record(ctx, instance, name)
	if err != nil {
		return snapshot.InstanceSnapshot{}, err
	}
	return r.InstanceSnapshot(instance), nil
}

// CreateInstanceSnapshot implements [snapshot.InstanceProvider], for
// [snapshot.Manager]'s generic sequence (Freeze, CreateInstanceSnapshot,
// thaw). When opts.Consistency is quiesced, the caller froze the guest
// through Freeze: the snapshot checks that the freeze still holds and
// records crash-consistent if it does not; the thaw then records the
// frozen window. A name ending in MemorySuffix makes a memory snapshot
// (the guest is thawed first: a restored guest must not wake up frozen).
// SnapshotInstance does all of it in one call, with the freeze verified
// and its window measured by the provider: a caller should prefer it.
func (p *Provider) CreateInstanceSnapshot(ctx context.Context, instance, name string, opts snapshot.InstanceSnapshotOptions) (snapshot.InstanceSnapshot, error) {
	so := SnapshotOptions{Metadata: opts.Metadata, Memory: strings.HasSuffix(name, MemorySuffix)}
	var held *frozen
	if opts.Consistency == snapshot.Quiesced {
		dom, uuid, err := p.lookup(instance)
		if err != nil {
			return snapshot.InstanceSnapshot{}, err
		}
		dom.Free()
		held = p.activeFreeze(uuid)
		if held != nil && so.Memory {
			if err := held.thaw(ctx); err != nil {
				return snapshot.InstanceSnapshot{}, err
			}
			held = nil
		}
	}
	if held == nil {
		// Not frozen by us (or thawed for a memory snapshot): whatever
		// the caller claims, the snapshot is what the provider achieves
		// unfrozen, and a running guest is not frozen again here.
		so.NoFreeze = !so.Memory
	}
	r, err := p.snapshot(ctx, instance, name, so, held)
	if err != nil && r.Name == "" {
		return snapshot.InstanceSnapshot{}, err
	}
	return r.InstanceSnapshot(instance), err
}

// SnapshotInstance takes a consistent snapshot of every disk of a domain in
// one call (SnapshotDisks with the options a mount has: the memory state
// for a name ending in MemorySuffix, RequireQuiesce from the Config). It is
// the one-call alternative to Manager's Freeze, CreateInstanceSnapshot,
// thaw sequence, with the freeze verified and the frozen window recorded.
func (p *Provider) SnapshotInstance(ctx context.Context, instance, name string, meta map[string]string) (snapshot.InstanceSnapshot, error) {
	r, err := p.SnapshotDisks(ctx, instance, name, SnapshotOptions{Metadata: meta, Memory: strings.HasSuffix(name, MemorySuffix)})
	if err != nil && r.Name == "" {
		return snapshot.InstanceSnapshot{}, err
	}
	return r.InstanceSnapshot(instance), err
}

// DescribeInstanceSnapshot implements [snapshot.InstanceSnapshotDescriber]:
// the record of the snapshot (domain XML, device mapping, layers, where the
// frozen window went, why it is not quiesced), which the mount shows in
// meta.json.
func (p *Provider) DescribeInstanceSnapshot(ctx context.Context, instance, name string) (any, error) {
	r, err := p.Record(ctx, instance, name)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// RevertInstance implements [snapshot.InstanceReverter]: [Provider.Revert].
func (p *Provider) RevertInstance(ctx context.Context, instance, name string) error {
	return p.Revert(ctx, instance, name)
}

// OpenDiskSnapshot opens disk device of snapshot name of a domain as the
// flattened, immutable image of the disk at the snapshot: the qcow2 chain
// whose top is the disk's layer (file disks), or the RBD snapshot through
// its pool's backend.
func (p *Provider) OpenDiskSnapshot(ctx context.Context, instance, name, device string) (qcow.Image, error) {
	r, err := p.Record(ctx, instance, name)
	if err != nil {
		return nil, err
	}
	d := r.disk(device)
	if d == nil {
		return nil, fmt.Errorf("%w: snapshot %q of instance %q has no disk %q", snapshot.ErrNotFound, name, instance, device)
	}
	switch d.Kind {
	case FileDisk:
		// The domain's own files: trusted, with absolute backing names.
		img, err := qcow.OpenPath(d.Layer, qcow.Options{})
		if err != nil {
			return nil, fmt.Errorf("instance %q: snapshot %q: disk %s: %w", instance, name, device, err)
		}
		return img, nil
	case RBDDisk:
		backend, ok := p.pool(d.Pool)
		if !ok {
			return nil, fmt.Errorf("%w: RBD pool %q is not mounted", snapshot.ErrUnsupported, d.Pool)
		}
		return backend.OpenSnapshot(ctx, d.Image, name)
	}
	return nil, fmt.Errorf("%w: disk %s of kind %s", snapshot.ErrUnsupported, device, d.Kind)
}

// The optional interfaces the mount and Manager use.
var (
	_ snapshot.InstanceProvider          = (*Provider)(nil)
	_ snapshot.ConsistentSnapshotter     = (*Provider)(nil)
	_ snapshot.InstanceDiskOpener        = (*Provider)(nil)
	_ snapshot.InstanceReverter          = (*Provider)(nil)
	_ snapshot.InstanceSnapshotDescriber = (*Provider)(nil)
)
