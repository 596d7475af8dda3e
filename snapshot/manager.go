package snapshot

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"snapfs/internal/units"
)

// DefaultFreezeTimeout bounds how long Manager keeps a guest frozen: past
// it the snapshot is abandoned and the guest thawed, so that a hung
// backend never leaves a guest frozen.
const DefaultFreezeTimeout = 10 * time.Second

// thawTimeout bounds the thaw itself, which runs even when the caller's
// context is done.
const thawTimeout = 30 * time.Second

// Manager holds what the mount and the CLI need on top of a [Backend] and
// an [InstanceProvider], whichever they are:
//
//   - consistent instance snapshots (SnapshotInstance): freeze a running
//     guest, snapshot every disk at one point, always thaw, and record the
//     consistency really achieved;
//   - holds (Hold): while a file of a snapshot is open in the mount, the
//     snapshot cannot be deleted (ErrBusy), whatever the backend.
//
// The fs layer calls Hold when it opens a file of a snapshot and the
// release function when the file is closed, and deletes snapshots through
// Manager.DeleteSnapshot and Manager.DeleteInstanceSnapshot. Holds live in
// the process: a CLI command in another process does not see the mount's
// holds (it still cannot break a reader of the local store, whose open
// images keep their files).
//
// A Manager is safe for concurrent use.
type Manager struct {
	Backend   Backend
	Instances InstanceProvider
	// RequireQuiesce refuses to snapshot a running instance whose guest
	// cannot be frozen (as Nova's os_require_quiesce), instead of falling
	// back to the provider's crash-consistent (or weaker) snapshot.
	RequireQuiesce bool
	// FreezeTimeout bounds the frozen window (DefaultFreezeTimeout if 0).
	FreezeTimeout time.Duration

	mu       sync.Mutex // protects the fields below
	holds    map[SnapshotRef]int
	deleting map[SnapshotRef]bool
}

// NewManager returns a Manager over a backend and an instance provider
// (which may be nil when there are no instances).
func NewManager(b Backend, p InstanceProvider) *Manager {
	return &Manager{Backend: b, Instances: p, holds: map[SnapshotRef]int{}, deleting: map[SnapshotRef]bool{}}
}

// Hold marks snapshot of volume as in use until release is called (once;
// later calls do nothing). ErrNotFound if it does not exist, ErrBusy while
// it is being deleted.
func (m *Manager) Hold(ctx context.Context, volume, snapshot string) (release func(), err error) {
	return m.hold(SnapshotRef{Volume: volume, Snapshot: snapshot}, func() error {
		if c, ok := m.Backend.(SnapshotChecker); ok {
			return c.SnapshotExists(ctx, volume, snapshot)
		}
		_, err := m.Backend.Snapshot(ctx, volume, snapshot)
		return err
	})
}

// hold holds ref, after which exists says whether it still exists.
func (m *Manager) hold(ref SnapshotRef, exists func() error) (release func(), err error) {
	volume, snapshot := ref.Volume, ref.Snapshot
	m.mu.Lock()
	if m.deleting[ref] {
		m.mu.Unlock()
		return nil, fmt.Errorf("%w: snapshot %q of volume %q is being deleted", ErrBusy, snapshot, volume)
	}
	m.holds[ref]++
	m.mu.Unlock()
	var once sync.Once
	release = func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.holds[ref]--; m.holds[ref] <= 0 {
				delete(m.holds, ref)
			}
		})
	}
	// Counted first, checked second: a delete that starts now sees the
	// hold, one that finished before makes this lookup fail.
	if err := exists(); err != nil {
		release()
		return nil, err
	}
	return release, nil
}

// claim marks refs as being deleted, or returns ErrBusy if one is held or
// already being deleted; the returned function unmarks them.
func (m *Manager) claim(refs ...SnapshotRef) (func(), error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ref := range refs {
		if n := m.holds[ref]; n > 0 {
			return nil, fmt.Errorf("%w: snapshot %q of volume %q has %s", ErrBusy, ref.Snapshot, ref.Volume, units.Count(n, "open file"))
		}
		if m.deleting[ref] {
			return nil, fmt.Errorf("%w: snapshot %q of volume %q is being deleted", ErrBusy, ref.Snapshot, ref.Volume)
		}
	}
	for _, ref := range refs {
		m.deleting[ref] = true
	}
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		for _, ref := range refs {
			delete(m.deleting, ref)
		}
	}, nil
}

// DeleteSnapshot deletes a snapshot through the backend, or returns
// ErrBusy while it is held.
func (m *Manager) DeleteSnapshot(ctx context.Context, volume, name string) error {
	done, err := m.claim(SnapshotRef{Volume: volume, Snapshot: name})
	if err != nil {
		return err
	}
	defer done()
	return m.Backend.DeleteSnapshot(ctx, volume, name)
}

// DeleteInstanceSnapshot deletes an instance snapshot through the
// provider, or returns ErrBusy while one of its disk snapshots is held.
func (m *Manager) DeleteInstanceSnapshot(ctx context.Context, instance, name string) error {
	if m.Instances == nil {
		return notFound("instance", instance)
	}
	rec, err := m.Instances.InstanceSnapshot(ctx, instance, name)
	if err != nil {
		return err
	}
	var refs []SnapshotRef
	for _, d := range rec.Disks {
		refs = append(refs, SnapshotRef{Volume: d.Volume, Snapshot: d.Snapshot})
	}
	done, err := m.claim(refs...)
	if err != nil {
		return err
	}
	defer done()
	return m.Instances.DeleteInstanceSnapshot(ctx, instance, name)
}

// SnapshotInstance takes snapshot name of every disk of an instance at one
// point. A running instance is frozen first (through the guest agent) and
// always thawed afterwards, even when the snapshot fails or ctx is done;
// the frozen window is bounded by FreezeTimeout. The consistency recorded
// is quiesced when the freeze worked; otherwise (a stopped instance, or a
// guest without an agent and RequireQuiesce unset) the provider records
// what it achieved on its own. A provider that is a
// [ConsistentSnapshotter] does all of it itself, with its own options.
//
// When the snapshot was taken but the thaw failed, both the snapshot and
// an error are returned: the guest may still be frozen.
func (m *Manager) SnapshotInstance(ctx context.Context, instance, name string, meta map[string]string) (InstanceSnapshot, error) {
	if m.Instances == nil {
		return InstanceSnapshot{}, notFound("instance", instance)
	}
	if err := CheckNewSnapshotName(name); err != nil {
		return InstanceSnapshot{}, err
	}
	// A provider that quiesces on its own does it all: freezing here
	// too would freeze the guest twice.
	if c, ok := m.Instances.(ConsistentSnapshotter); ok {
		snap, err := c.SnapshotInstance(ctx, instance, name, meta)
		if !errors.Is(err, errNotOwn) {
			return snap, err
		}
	}
	inst, err := m.Instances.Instance(ctx, instance)
	if err != nil {
		return InstanceSnapshot{}, err
	}
	opts := InstanceSnapshotOptions{Metadata: meta}
	if !inst.Running {
		return m.Instances.CreateInstanceSnapshot(ctx, instance, name, opts)
	}
	thaw, err := m.Instances.Freeze(ctx, instance)
	if err != nil {
		if m.RequireQuiesce || !errors.Is(err, ErrUnsupported) {
			return InstanceSnapshot{}, fmt.Errorf("instance %q: freeze: %w", instance, err)
		}
		return m.Instances.CreateInstanceSnapshot(ctx, instance, name, opts)
	}
	opts.Consistency, opts.FrozenSince = Quiesced, time.Now()
	timeout := m.FreezeTimeout
	if timeout <= 0 {
		timeout = DefaultFreezeTimeout
	}
	snap, err := func() (InstanceSnapshot, error) {
		sctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return m.Instances.CreateInstanceSnapshot(sctx, instance, name, opts)
	}()
	// The thaw runs whatever happened, on a context of its own: the
	// caller's may be cancelled already.
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), thawTimeout)
	defer cancel()
	if terr := thaw(tctx); terr != nil {
		terr = fmt.Errorf("instance %q: thaw: %w", instance, terr)
		if err != nil {
			return InstanceSnapshot{}, errors.Join(err, terr)
		}
		return snap, terr
	}
	return snap, err
}

// Clone makes volume newName a copy-on-write clone of snapshot snap of
// volume, through the backend's [Cloner]; ErrUnsupported when it has none.
func (m *Manager) Clone(ctx context.Context, volume, snap, newName string) (Volume, error) {
	c, ok := m.Backend.(Cloner)
	if !ok {
		return Volume{}, fmt.Errorf("%w: backend %s makes no clones", ErrUnsupported, m.Backend.Name())
	}
	return c.Clone(ctx, volume, snap, newName)
}

// Flatten cuts a clone from its parent (see [Cloner]); ErrUnsupported when
// the backend makes no clones. The context's progress function
// (WithProgress) sees the copy.
func (m *Manager) Flatten(ctx context.Context, volume string) error {
	c, ok := m.Backend.(Cloner)
	if !ok {
		return fmt.Errorf("%w: backend %s makes no clones", ErrUnsupported, m.Backend.Name())
	}
	return c.Flatten(ctx, volume)
}

// Revert makes the head of volume read as snapshot snap again (see
// [Reverter]); ErrUnsupported when the backend cannot.
func (m *Manager) Revert(ctx context.Context, volume, snap string) error {
	r, ok := m.Backend.(Reverter)
	if !ok {
		return fmt.Errorf("%w: backend %s cannot revert a volume", ErrUnsupported, m.Backend.Name())
	}
	return r.Revert(ctx, volume, snap)
}

// RestoreDir restores a snapshot folder copied out of the mount (see
// RestoreDir) through the backend's [Restorer]; ErrUnsupported when it has
// none.
func (m *Manager) RestoreDir(ctx context.Context, dir, name string) (Restored, error) {
	r, ok := m.Backend.(Restorer)
	if !ok {
		return Restored{}, fmt.Errorf("%w: backend %s cannot restore snapshot folders", ErrUnsupported, m.Backend.Name())
	}
	return RestoreDir(ctx, r, dir, name)
}
