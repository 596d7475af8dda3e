package snapshot

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"snapfs/internal/units"
)

// The local store's instances are named groups of its volumes. They never
// run (no VM is attached to them), so their snapshots need no freeze and
// are crash-consistent: every disk is taken in one commit.

// CreateInstance defines an instance over existing volumes, each under a
// device name (vda, vdb, ...).
func (s *LocalStore) CreateInstance(ctx context.Context, name string, disks []Disk) (Instance, error) {
	if err := CheckInstanceName(name); err != nil {
		return Instance{}, err
	}
	if len(disks) == 0 {
		return Instance{}, fmt.Errorf("%w: instance %q has no disks", ErrInvalid, name)
	}
	devices, volumes := map[string]bool{}, map[string]bool{}
	for _, d := range disks {
		if err := CheckDeviceName(d.Device); err != nil {
			return Instance{}, err
		}
		if devices[d.Device] {
			return Instance{}, fmt.Errorf("%w: device %q given twice", ErrInvalid, d.Device)
		}
		if volumes[d.Volume] {
			return Instance{}, fmt.Errorf("%w: volume %q given twice", ErrInvalid, d.Volume)
		}
		devices[d.Device], volumes[d.Volume] = true, true
	}
	disks = slices.Clone(disks)
	err := s.commit(ctx, func(m *storeMeta) error {
		if m.Instances[name] != nil {
			return fmt.Errorf("%w: instance %q", ErrExists, name)
		}
		for _, d := range disks {
			if _, err := m.volume(d.Volume); err != nil {
				return err
			}
		}
		m.Instances[name] = &instanceMeta{Created: now(), Disks: disks}
		return nil
	})
	if err != nil {
		return Instance{}, err
	}
	return s.Instance(ctx, name)
}

// DeleteInstance removes an instance definition; its volumes stay. ErrBusy
// while it has snapshots.
func (s *LocalStore) DeleteInstance(ctx context.Context, name string) error {
	return s.commit(ctx, func(m *storeMeta) error {
		in := m.Instances[name]
		if in == nil {
			return notFound("instance", name)
		}
		if len(in.Snapshots) > 0 {
			return fmt.Errorf("%w: instance %q has %s; delete them first", ErrBusy, name, units.Count(len(in.Snapshots), "snapshot"))
		}
		delete(m.Instances, name)
		return nil
	})
}

func toInstance(name string, in *instanceMeta) Instance {
	return Instance{Name: name, Disks: slices.Clone(in.Disks), Created: in.Created}
}

// ListInstances implements [InstanceProvider]: every instance, by name.
func (s *LocalStore) ListInstances(ctx context.Context) ([]Instance, error) {
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	out := []Instance{}
	for name, in := range m.Instances {
		out = append(out, toInstance(name, in))
	}
	slices.SortFunc(out, func(a, b Instance) int { return cmpString(a.Name, b.Name) })
	return out, nil
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Instance implements [InstanceProvider].
func (s *LocalStore) Instance(ctx context.Context, name string) (Instance, error) {
	m, err := s.load()
	if err != nil {
		return Instance{}, err
	}
	in := m.Instances[name]
	if in == nil {
		return Instance{}, notFound("instance", name)
	}
	return toInstance(name, in), nil
}

// Freeze implements [InstanceProvider]: local instances never run, so
// there is nothing to freeze (ErrUnsupported; Manager does not ask).
func (s *LocalStore) Freeze(ctx context.Context, name string) (func(context.Context) error, error) {
	return nil, fmt.Errorf("%w: instance %q of the local store does not run; nothing to freeze", ErrUnsupported, name)
}

func toInstanceSnapshot(instance string, r instanceSnapshotMeta) InstanceSnapshot {
	return InstanceSnapshot{
		Instance:    instance,
		Name:        r.Name,
		Created:     r.Created,
		Consistency: r.Consistency,
		Disks:       slices.Clone(r.Disks),
		Frozen:      r.Frozen,
		Metadata:    copyMetadata(r.Metadata),
	}
}

// findRecord returns the index of instance snapshot name in, or -1.
func (in *instanceMeta) findRecord(name string) int {
	return slices.IndexFunc(in.Snapshots, func(r instanceSnapshotMeta) bool { return r.Name == name })
}

// ListInstanceSnapshots implements [InstanceProvider]. Snapshots being
// deleted are not listed.
func (s *LocalStore) ListInstanceSnapshots(ctx context.Context, instance string) ([]InstanceSnapshot, error) {
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	in := m.Instances[instance]
	if in == nil {
		return nil, notFound("instance", instance)
	}
	out := []InstanceSnapshot{}
	for _, r := range in.Snapshots {
		if !r.Deleting {
			out = append(out, toInstanceSnapshot(instance, r))
		}
	}
	return out, nil
}

// InstanceSnapshot implements [InstanceProvider].
func (s *LocalStore) InstanceSnapshot(ctx context.Context, instance, name string) (InstanceSnapshot, error) {
	m, err := s.load()
	if err != nil {
		return InstanceSnapshot{}, err
	}
	in := m.Instances[instance]
	if in == nil {
		return InstanceSnapshot{}, notFound("instance", instance)
	}
	i := in.findRecord(name)
	if i < 0 || in.Snapshots[i].Deleting {
		return InstanceSnapshot{}, fmt.Errorf("%w: snapshot %q of instance %q", ErrNotFound, name, instance)
	}
	return toInstanceSnapshot(instance, in.Snapshots[i]), nil
}

// CreateInstanceSnapshot implements [InstanceProvider]: snapshot name on
// every disk's volume and the instance record, all in one metadata commit.
// The consistency defaults to crash-consistent.
func (s *LocalStore) CreateInstanceSnapshot(ctx context.Context, instance, name string, opts InstanceSnapshotOptions) (InstanceSnapshot, error) {
	if err := CheckNewSnapshotName(name); err != nil {
		return InstanceSnapshot{}, err
	}
	if err := checkMetadata(opts.Metadata); err != nil {
		return InstanceSnapshot{}, err
	}
	consistency := opts.Consistency
	if consistency == "" {
		consistency = CrashConsistent
	}
	m, err := s.load()
	if err != nil {
		return InstanceSnapshot{}, err
	}
	in := m.Instances[instance]
	if in == nil {
		return InstanceSnapshot{}, notFound("instance", instance)
	}
	if in.findRecord(name) >= 0 {
		return InstanceSnapshot{}, fmt.Errorf("%w: snapshot %q of instance %q", ErrExists, name, instance)
	}
	disks := slices.Clone(in.Disks)
	var volumes []string
	for _, d := range disks {
		volumes = append(volumes, d.Volume)
	}
	record := func(m *storeMeta) error {
		in := m.Instances[instance]
		if in == nil {
			return notFound("instance", instance)
		}
		if !slices.Equal(in.Disks, disks) {
			return fmt.Errorf("%w: the disks of instance %q changed during the snapshot", ErrBusy, instance)
		}
		if in.findRecord(name) >= 0 {
			return fmt.Errorf("%w: snapshot %q of instance %q", ErrExists, name, instance)
		}
		rec := instanceSnapshotMeta{Name: name, Consistency: consistency, Metadata: copyMetadata(opts.Metadata)}
		if !opts.FrozenSince.IsZero() {
			rec.Frozen = time.Since(opts.FrozenSince)
		}
		for _, d := range disks {
			v := m.Volumes[d.Volume]
			rec.Created = v.Layers[v.findSnapshot(name)].Snapshot.Created
			rec.Disks = append(rec.Disks, SnapshotDisk{Device: d.Device, Volume: d.Volume, Snapshot: name})
		}
		in.Snapshots = append(in.Snapshots, rec)
		return nil
	}
	_, err = s.createSnapshots(ctx, volumes, name, SnapshotOptions{Consistency: consistency}, instance, record)
	if err != nil {
		return InstanceSnapshot{}, err
	}
	return s.InstanceSnapshot(ctx, instance, name)
}

// DeleteInstanceSnapshot implements [InstanceProvider]. The record is
// first marked (hidden from now on), then each disk snapshot is deleted,
// then the record goes. A crash in between leaves the mark, and OpenLocal
// (or a new DeleteInstanceSnapshot) finishes the job.
func (s *LocalStore) DeleteInstanceSnapshot(ctx context.Context, instance, name string) error {
	err := s.commit(ctx, func(m *storeMeta) error {
		in := m.Instances[instance]
		if in == nil {
			return notFound("instance", instance)
		}
		i := in.findRecord(name)
		if i < 0 {
			return fmt.Errorf("%w: snapshot %q of instance %q", ErrNotFound, name, instance)
		}
		// Refuse now what would stop the deletion half-way.
		for _, d := range in.Snapshots[i].Disks {
			v, j, err := m.snapshotLayer(d.Volume, d.Snapshot)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if err := deletable(m, d.Volume, v, j, instance); err != nil {
				return err
			}
			if j == len(v.Layers)-1 {
				if err := s.headFree(d.Volume, v); err != nil {
					return err
				}
			}
		}
		in.Snapshots[i].Deleting = true
		return nil
	})
	if err != nil {
		return err
	}
	pauseAt(PauseInstanceDeleteMarked)
	return s.finishInstanceSnapshotDelete(ctx, instance, name)
}

// finishInstanceSnapshotDelete deletes what is left of a marked instance
// snapshot: its disk snapshots, then the record.
func (s *LocalStore) finishInstanceSnapshotDelete(ctx context.Context, instance, name string) error {
	m, err := s.load()
	if err != nil {
		return err
	}
	in := m.Instances[instance]
	if in == nil {
		return nil
	}
	i := in.findRecord(name)
	if i < 0 {
		return nil
	}
	for _, d := range in.Snapshots[i].Disks {
		err := s.deleteSnapshot(ctx, d.Volume, d.Snapshot, instance)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("disk %s: %w", d.Device, err)
		}
	}
	return s.commit(ctx, func(m *storeMeta) error {
		if in := m.Instances[instance]; in != nil {
			if i := in.findRecord(name); i >= 0 {
				in.Snapshots = slices.Delete(in.Snapshots, i, i+1)
			}
		}
		return nil
	})
}

// instanceSnapshotDeleting reports whether instance snapshot name is
// marked for deletion.
func (m *storeMeta) instanceSnapshotDeleting(instance, name string) bool {
	in := m.Instances[instance]
	if in == nil {
		return false
	}
	i := in.findRecord(name)
	return i >= 0 && in.Snapshots[i].Deleting
}
