package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log"
	"slices"
	"strings"
	"sync"

	"snapfs/qcow"
)

// ConsistentSnapshotter is implemented by instance providers that take a
// consistent snapshot of a running instance on their own (the libvirt
// provider: freeze through the guest agent, snapshot every disk, verify the
// freeze held, always thaw, and record the frozen window it measured).
// [Manager.SnapshotInstance] calls it instead of its generic sequence
// (Freeze, CreateInstanceSnapshot, thaw), so that the guest is not frozen
// twice; the provider's own options (RequireQuiesce) then apply.
type ConsistentSnapshotter interface {
	SnapshotInstance(ctx context.Context, instance, name string, meta map[string]string) (InstanceSnapshot, error)
}

// InstanceDiskOpener is implemented by instance providers whose snapshot
// disks are not all snapshots of the backend's volumes (the libvirt
// provider: a file disk's snapshot is a qcow2 layer outside any store).
// [Manager.OpenInstanceDisk] reads the disks through it.
type InstanceDiskOpener interface {
	// OpenDiskSnapshot returns the flattened, immutable image of disk
	// device of snapshot name of instance.
	OpenDiskSnapshot(ctx context.Context, instance, name, device string) (qcow.Image, error)
}

// InstanceReverter is implemented by instance providers that can revert an
// instance to one of its snapshots (the libvirt provider: a shut-off
// domain's disks, and a memory snapshot's running state).
// [Manager.RevertInstance] calls it. (Not Revert: that is [Reverter]'s,
// whose volume and snapshot arguments a backend that is also an instance
// provider, like the local store, must not take for an instance's.)
type InstanceReverter interface {
	RevertInstance(ctx context.Context, instance, name string) error
}

// errNotOwn is returned by the optional methods of a [MergedInstances]
// whose member provider lacks them: Manager then does what it does for a
// provider without them.
var errNotOwn = errors.New("snapshot: the provider has no method of its own for this")

// MergedInstances shows the instances of several providers as one (the
// local store's instance groups and libvirt's domains under one
// instances/). Each instance belongs to the first provider, in order, that
// has it; an instance of the same name in a later provider is hidden, and
// logged once. Every call on an instance goes to the provider it belongs
// to, the optional interfaces (ConsistentSnapshotter, InstanceDiskOpener,
// InstanceReverter) included.
type MergedInstances struct {
	providers []InstanceProvider
	logf      func(format string, args ...any)

	mu     sync.Mutex // protects logged
	logged map[string]bool
}

var (
	_ InstanceProvider      = (*MergedInstances)(nil)
	_ ConsistentSnapshotter = (*MergedInstances)(nil)
	_ InstanceDiskOpener    = (*MergedInstances)(nil)
	_ InstanceReverter      = (*MergedInstances)(nil)
)

// MergeInstances returns the providers shown as one, the first one winning
// a name clash. logf logs the clashes (log.Printf when nil).
func MergeInstances(logf func(format string, args ...any), providers ...InstanceProvider) *MergedInstances {
	if logf == nil {
		logf = log.Printf
	}
	return &MergedInstances{providers: providers, logf: logf, logged: map[string]bool{}}
}

// owner returns the provider instance belongs to: the first that does not
// answer ErrNotFound.
func (m *MergedInstances) owner(ctx context.Context, instance string) (InstanceProvider, Instance, error) {
	for _, p := range m.providers {
		in, err := p.Instance(ctx, instance)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		return p, in, err
	}
	return nil, Instance{}, notFound("instance", instance)
}

// ListInstances implements [InstanceProvider]: every provider's instances,
// sorted by name, a clash won by the first provider.
func (m *MergedInstances) ListInstances(ctx context.Context) ([]Instance, error) {
	seen := map[string]bool{}
	var out []Instance
	for i, p := range m.providers {
		all, err := p.ListInstances(ctx)
		if err != nil {
			return nil, err
		}
		for _, in := range all {
			if seen[in.Name] {
				m.clash(in.Name, i)
				continue
			}
			seen[in.Name] = true
			out = append(out, in)
		}
	}
	slices.SortFunc(out, func(a, b Instance) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// clash logs, once per name, that provider i's instance name is hidden.
func (m *MergedInstances) clash(name string, i int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.logged[name] {
		return
	}
	m.logged[name] = true
	m.logf("snapfs: instance %q of instance provider %d is hidden by an instance of the same name of an earlier provider", name, i+1)
}

// Instance implements [InstanceProvider].
func (m *MergedInstances) Instance(ctx context.Context, name string) (Instance, error) {
	_, in, err := m.owner(ctx, name)
	return in, err
}

// Freeze implements [InstanceProvider].
func (m *MergedInstances) Freeze(ctx context.Context, name string) (func(context.Context) error, error) {
	p, _, err := m.owner(ctx, name)
	if err != nil {
		return nil, err
	}
	return p.Freeze(ctx, name)
}

// ListInstanceSnapshots implements [InstanceProvider].
func (m *MergedInstances) ListInstanceSnapshots(ctx context.Context, instance string) ([]InstanceSnapshot, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return nil, err
	}
	return p.ListInstanceSnapshots(ctx, instance)
}

// InstanceSnapshot implements [InstanceProvider].
func (m *MergedInstances) InstanceSnapshot(ctx context.Context, instance, name string) (InstanceSnapshot, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return InstanceSnapshot{}, err
	}
	return p.InstanceSnapshot(ctx, instance, name)
}

// CreateInstanceSnapshot implements [InstanceProvider].
func (m *MergedInstances) CreateInstanceSnapshot(ctx context.Context, instance, name string, opts InstanceSnapshotOptions) (InstanceSnapshot, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return InstanceSnapshot{}, err
	}
	return p.CreateInstanceSnapshot(ctx, instance, name, opts)
}

// DeleteInstanceSnapshot implements [InstanceProvider].
func (m *MergedInstances) DeleteInstanceSnapshot(ctx context.Context, instance, name string) error {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return err
	}
	return p.DeleteInstanceSnapshot(ctx, instance, name)
}

// SnapshotInstance implements [ConsistentSnapshotter] for the instances of
// providers that do.
func (m *MergedInstances) SnapshotInstance(ctx context.Context, instance, name string, meta map[string]string) (InstanceSnapshot, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return InstanceSnapshot{}, err
	}
	c, ok := p.(ConsistentSnapshotter)
	if !ok {
		return InstanceSnapshot{}, errNotOwn
	}
	return c.SnapshotInstance(ctx, instance, name, meta)
}

// OpenDiskSnapshot implements [InstanceDiskOpener] for the instances of
// providers that do.
func (m *MergedInstances) OpenDiskSnapshot(ctx context.Context, instance, name, device string) (qcow.Image, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return nil, err
	}
	o, ok := p.(InstanceDiskOpener)
	if !ok {
		return nil, errNotOwn
	}
	return o.OpenDiskSnapshot(ctx, instance, name, device)
}

// RevertInstance implements [InstanceReverter] for the instances of
// providers that do.
func (m *MergedInstances) RevertInstance(ctx context.Context, instance, name string) error {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return err
	}
	r, ok := p.(InstanceReverter)
	if !ok {
		return errNotOwn
	}
	return r.RevertInstance(ctx, instance, name)
}

// instanceDisk returns disk device of instance snapshot name.
func (m *Manager) instanceDisk(ctx context.Context, instance, name, device string) (SnapshotDisk, error) {
	if m.Instances == nil {
		return SnapshotDisk{}, notFound("instance", instance)
	}
	s, err := m.Instances.InstanceSnapshot(ctx, instance, name)
	if err != nil {
		return SnapshotDisk{}, err
	}
	for _, d := range s.Disks {
		if d.Device == device {
			return d, nil
		}
	}
	return SnapshotDisk{}, fmt.Errorf("%w: snapshot %q of instance %q has no disk %q", ErrNotFound, name, instance, device)
}

// OpenInstanceDisk returns the flattened, immutable image of disk device of
// instance snapshot name: through the provider's [InstanceDiskOpener] when
// it has one, else the backend's snapshot that holds the disk.
func (m *Manager) OpenInstanceDisk(ctx context.Context, instance, name, device string) (qcow.Image, error) {
	if o, ok := m.Instances.(InstanceDiskOpener); ok {
		img, err := o.OpenDiskSnapshot(ctx, instance, name, device)
		if !errors.Is(err, errNotOwn) {
			return img, err
		}
	}
	d, err := m.instanceDisk(ctx, instance, name, device)
	if err != nil {
		return nil, err
	}
	return m.Backend.OpenSnapshot(ctx, d.Volume, d.Snapshot)
}

// HoldInstanceDisk is Hold for disk device of an instance snapshot, whose
// snapshot may not be one of the backend's (see InstanceDiskOpener): it
// holds the disk's SnapshotRef, which DeleteInstanceSnapshot claims.
func (m *Manager) HoldInstanceDisk(ctx context.Context, instance, name, device string) (release func(), err error) {
	d, err := m.instanceDisk(ctx, instance, name, device)
	if err != nil {
		return nil, err
	}
	return m.hold(SnapshotRef{Volume: d.Volume, Snapshot: d.Snapshot}, func() error {
		_, err := m.instanceDisk(ctx, instance, name, device)
		return err
	})
}

// RevertInstance reverts an instance to one of its snapshots through the
// provider's [InstanceReverter]; ErrUnsupported when it has none.
func (m *Manager) RevertInstance(ctx context.Context, instance, name string) error {
	if m.Instances == nil {
		return notFound("instance", instance)
	}
	if r, ok := m.Instances.(InstanceReverter); ok {
		err := r.RevertInstance(ctx, instance, name)
		if !errors.Is(err, errNotOwn) {
			return err
		}
	}
	return fmt.Errorf("%w: instance %q cannot be reverted by its provider (revert its volumes one by one)", ErrUnsupported, instance)
}

// InstanceSnapshotDescriber is implemented by instance providers that keep
// more about a snapshot than [InstanceSnapshot] holds (libvirt: the domain
// XML, the device mapping, where the frozen window went); the mount shows
// it in meta.json, under "provider".
type InstanceSnapshotDescriber interface {
	DescribeInstanceSnapshot(ctx context.Context, instance, name string) (any, error)
}

// DescribeInstanceSnapshot implements [InstanceSnapshotDescriber] for the
// instances of providers that do.
func (m *MergedInstances) DescribeInstanceSnapshot(ctx context.Context, instance, name string) (any, error) {
	p, _, err := m.owner(ctx, instance)
	if err != nil {
		return nil, err
	}
	d, ok := p.(InstanceSnapshotDescriber)
	if !ok {
		return nil, errNotOwn
	}
	return d.DescribeInstanceSnapshot(ctx, instance, name)
}

// InstanceSnapshotInfo is the meta.json of an instance snapshot in the
// mount: the exchange format (what a restore reads), and what the provider
// keeps besides, if anything.
type InstanceSnapshotInfo struct {
	InstanceSnapshotMeta
	Provider any `json:"provider,omitempty"`
}

// InstanceSnapshotInfo returns the meta.json of snapshot name of instance.
// A provider with its own disk reader (InstanceDiskOpener) gives the disk
// sizes; the others' disks are the backend's snapshots
// (InstanceSnapshotMetaFor).
func (m *Manager) InstanceSnapshotInfo(ctx context.Context, instance, name string) (InstanceSnapshotInfo, error) {
	if m.Instances == nil {
		return InstanceSnapshotInfo{}, notFound("instance", instance)
	}
	var info InstanceSnapshotInfo
	if d, ok := m.Instances.(InstanceSnapshotDescriber); ok {
		p, err := d.DescribeInstanceSnapshot(ctx, instance, name)
		if err != nil && !errors.Is(err, errNotOwn) {
			return InstanceSnapshotInfo{}, err
		}
		info.Provider = p
	}
	o, own := m.Instances.(InstanceDiskOpener)
	if own && info.Provider == nil {
		// A provider may read its disks without describing them: ask.
		_, err := o.OpenDiskSnapshot(ctx, instance, name, "")
		own = !errors.Is(err, errNotOwn)
	}
	if !own {
		meta, err := InstanceSnapshotMetaFor(ctx, m.Backend, m.Instances, instance, name)
		info.InstanceSnapshotMeta = meta
		return info, err
	}
	rec, err := m.Instances.InstanceSnapshot(ctx, instance, name)
	if err != nil {
		return InstanceSnapshotInfo{}, err
	}
	info.InstanceSnapshotMeta = InstanceSnapshotMeta{
		Kind: KindInstanceSnapshot, Version: MetaVersion,
		Instance: rec.Instance, Name: rec.Name, Created: rec.Created,
		Consistency: rec.Consistency, Frozen: rec.Frozen, Metadata: rec.Metadata,
		Disks: []DiskMeta{},
	}
	for _, d := range rec.Disks {
		img, err := o.OpenDiskSnapshot(ctx, instance, name, d.Device)
		if err != nil {
			return InstanceSnapshotInfo{}, fmt.Errorf("disk %s: %w", d.Device, err)
		}
		size := img.Size()
		img.Close()
		info.Disks = append(info.Disks, DiskMeta{Device: d.Device, Volume: d.Volume, Snapshot: d.Snapshot, Size: size})
	}
	return info, nil
}
