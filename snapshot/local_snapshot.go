package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"snapfs/qcow"
)

// ListSnapshots implements [Backend]: the snapshots of a volume, oldest
// first.
func (s *LocalStore) ListSnapshots(ctx context.Context, volume string) ([]Snapshot, error) {
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	v, err := m.volume(volume)
	if err != nil {
		return nil, err
	}
	out := []Snapshot{}
	for i, l := range v.Layers {
		if l.Snapshot != nil {
			out = append(out, s.toSnapshot(m, volume, v, i))
		}
	}
	return out, nil
}

// Snapshot implements [Backend].
func (s *LocalStore) Snapshot(ctx context.Context, volume, name string) (Snapshot, error) {
	m, err := s.load()
	if err != nil {
		return Snapshot{}, err
	}
	v, i, err := m.snapshotLayer(volume, name)
	if err != nil {
		return Snapshot{}, err
	}
	return s.toSnapshot(m, volume, v, i), nil
}

// CreateSnapshots implements [Backend]. Each volume's head becomes the
// snapshot's read-only layer and a new empty overlay on top of it becomes
// the head: O(1) whatever the size, no data copied. All the volumes
// switch in one metadata commit, so the snapshots exist all or none. The
// consistency recorded defaults to crash-consistent: the store takes every
// disk at one instant, and refuses (ErrBusy) a head that qemu has open.
func (s *LocalStore) CreateSnapshots(ctx context.Context, volumes []string, name string, opts SnapshotOptions) ([]Snapshot, error) {
	return s.createSnapshots(ctx, volumes, name, opts, "", nil)
}

// createSnapshots is CreateSnapshots for an instance snapshot too: the
// snapshots are marked as the instance's, and record adds the instance
// record to the same commit.
func (s *LocalStore) createSnapshots(ctx context.Context, volumes []string, name string, opts SnapshotOptions,
	instance string, record func(m *storeMeta) error) ([]Snapshot, error) {
	if err := CheckNewSnapshotName(name); err != nil {
		return nil, err
	}
	if len(volumes) == 0 {
		return nil, fmt.Errorf("%w: no volume to snapshot", ErrInvalid)
	}
	seen := map[string]bool{}
	for _, vol := range volumes {
		if seen[vol] {
			return nil, fmt.Errorf("%w: volume %q given twice", ErrInvalid, vol)
		}
		seen[vol] = true
	}
	if err := checkMetadata(opts.Metadata); err != nil {
		return nil, err
	}
	consistency := opts.Consistency
	if consistency == "" {
		consistency = CrashConsistent
	}
	if err := consistency.check(); err != nil {
		return nil, err
	}
	release, err := s.lockVolumes(ctx, volumes...)
	if err != nil {
		return nil, err
	}
	defer release()
	for _, vol := range volumes {
		if err := s.settle(ctx, vol); err != nil {
			return nil, err
		}
	}
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	oldHeads := map[string]string{}
	for _, vol := range volumes {
		v, err := m.volume(vol)
		if err != nil {
			return nil, err
		}
		if v.findSnapshot(name) >= 0 {
			return nil, fmt.Errorf("%w: snapshot %q of volume %q", ErrExists, name, vol)
		}
		// The new chain: the new head, the old head, the layers below.
		if depth := 2 + len(m.chainBelow(v, len(v.Layers)-1)); depth > qcow.DefaultMaxDepth {
			return nil, fmt.Errorf("%w: volume %q would have %d layers, more than the %d a chain may have; delete a snapshot first",
				ErrUnsupported, vol, depth, qcow.DefaultMaxDepth)
		}
		if err := s.headFree(vol, v); err != nil {
			return nil, err
		}
		oldHeads[vol] = v.Head
	}

	heads := map[string]*newFile{}
	committed := false
	defer func() {
		for _, nf := range heads {
			if committed {
				nf.release()
			} else {
				nf.discard()
			}
		}
	}()
	for _, vol := range volumes {
		nf, err := s.createFile(newLayerName(), true)
		if err != nil {
			return nil, err
		}
		heads[vol] = nf
		if err := qcow.CreateOverlay(nf.f, m.Volumes[vol].Size, 0, oldHeads[vol], "qcow2"); err != nil {
			return nil, fmt.Errorf("volume %q: new head: %w", vol, err)
		}
		if err := nf.publish(layerMode(true)); err != nil {
			return nil, err
		}
	}
	if err := s.syncLayers(); err != nil {
		return nil, err
	}
	pauseAt(PauseSnapshotWritten)

	created := now()
	err = s.commit(ctx, func(m *storeMeta) error {
		for _, vol := range volumes {
			v, err := m.volume(vol)
			if err != nil {
				return err
			}
			if v.Head != oldHeads[vol] {
				panic("BUG: the head of a locked volume changed")
			}
			if v.findSnapshot(name) >= 0 {
				return fmt.Errorf("%w: snapshot %q of volume %q", ErrExists, name, vol)
			}
			v.Layers = append(v.Layers, layerMeta{File: v.Head, Snapshot: &snapshotMeta{
				Name: name, Created: created, Consistency: consistency,
				Metadata: copyMetadata(opts.Metadata), Instance: instance,
			}})
			v.Head = filepath.Base(heads[vol].final)
		}
		if record != nil {
			return record(m)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	committed = true
	pauseAt(PauseSnapshotCommitted)
	// Read-only from now on; qemu opens backing files read-only anyway,
	// this stops a mistaken qemu-io -c write from a user (root ignores it).
	for _, old := range oldHeads {
		os.Chmod(s.layerPath(old), layerMode(false))
	}
	out := make([]Snapshot, 0, len(volumes))
	for _, vol := range volumes {
		snap, err := s.Snapshot(ctx, vol, name)
		if err != nil {
			return nil, err
		}
		out = append(out, snap)
	}
	return out, nil
}

// check refuses unknown consistency levels.
func (c Consistency) check() error {
	switch c {
	case Quiesced, CrashConsistent, None:
		return nil
	}
	return fmt.Errorf("%w: consistency %q: want %s, %s or %s", ErrInvalid, c, Quiesced, CrashConsistent, None)
}

// DeleteSnapshot implements [Backend]. The snapshot's child layer (the
// next snapshot, or the head) is rewritten to hold its own clusters plus
// those of the deleted layer that it does not override, on top of the
// deleted layer's parent, and renamed over the old child: every other
// snapshot and the head read exactly as before, and images opened before
// keep reading the old files. It costs a copy of the child and the deleted
// layer's data. ErrBusy while clones read through the snapshot, while it
// belongs to an instance snapshot (delete that instead; but when that
// one's delete was cut short, which hides it, this finishes it), or when
// the child is the head and qemu has it open.
func (s *LocalStore) DeleteSnapshot(ctx context.Context, volume, name string) error {
	err := s.deleteSnapshot(ctx, volume, name, "")
	if errors.Is(err, ErrBusy) {
		// A disk snapshot left by an instance snapshot delete that
		// another process started and did not finish (killed): the
		// instance snapshot is hidden, so "delete that instead" cannot
		// be followed, and only the next OpenLocal would finish it.
		// Finish it here instead.
		if inst := s.deletingOwner(volume, name); inst != "" {
			return s.finishInstanceSnapshotDelete(ctx, inst, name)
		}
	}
	return err
}

// deletingOwner returns the instance whose snapshot, marked for deletion,
// holds snapshot name of volume ("" for none).
func (s *LocalStore) deletingOwner(volume, name string) string {
	m, err := s.load()
	if err != nil {
		return ""
	}
	v, i, err := m.snapshotLayer(volume, name)
	if err != nil {
		return ""
	}
	if sm := v.Layers[i].Snapshot; sm.Instance != "" && m.instanceSnapshotDeleting(sm.Instance, sm.Name) {
		return sm.Instance
	}
	return ""
}

// deleteSnapshot is DeleteSnapshot on behalf of owner, the instance whose
// snapshot is being deleted ("" for none).
//
// The steps, each safe to interrupt:
//  1. commit the intent (volumeMeta.Merging): from now on the layer under
//     the child may be skipped by the child's backing file;
//  2. write the merged child and rename it over the child: every image
//     reads as before, the deleted layer is simply no longer read;
//  3. commit the layer's removal and clear the intent;
//  4. remove the layer file.
//
// After a crash between 1 and 3, resolveMerge (run by OpenLocal and before
// the next mutation of the volume) looks at the child's backing file and
// finishes step 3 if the rename happened, or clears the intent if not.
// Without the intent, metadata would say the child sits on the deleted
// layer while its header says otherwise, and a later delete of the layer
// below would remove a file the child still reads.
// lockSnapshot begins a mutation of snapshot snap of volume: it locks the
// volume, finishes what a crash cut short there (settle), and returns the
// store's metadata with the volume and the index of snap's layer in its
// chain. The caller calls release when done; on error nothing is held.
func (s *LocalStore) lockSnapshot(ctx context.Context, volume, snap string) (release func(), m *storeMeta, v *volumeMeta, i int, err error) {
	unlock, err := s.lockVolumes(ctx, volume)
	if err != nil {
		return nil, nil, nil, 0, err
	}
	if err = s.settle(ctx, volume); err == nil {
		if m, err = s.load(); err == nil {
			v, i, err = m.snapshotLayer(volume, snap)
		}
	}
	if err != nil {
		unlock()
		return nil, nil, nil, 0, err
	}
	return unlock, m, v, i, nil
}

func (s *LocalStore) deleteSnapshot(ctx context.Context, volume, name, owner string) error {
	release, m, v, i, err := s.lockSnapshot(ctx, volume, name)
	if err != nil {
		return err
	}
	defer release()
	if err := deletable(m, volume, v, i, owner); err != nil {
		return err
	}
	deleted := v.Layers[i].File
	child, childIsHead := v.Head, i == len(v.Layers)-1
	if !childIsHead {
		child = v.Layers[i+1].File
	}
	if childIsHead {
		if err := s.headFree(volume, v); err != nil {
			return err
		}
	}
	below := m.belowFile(v, i)

	err = s.commit(ctx, func(m *storeMeta) error {
		v, j, err := m.snapshotLayer(volume, name)
		if err != nil {
			return err
		}
		if j != i || v.Layers[j].File != deleted {
			panic("BUG: the layers of a locked volume changed")
		}
		if err := deletable(m, volume, v, j, owner); err != nil {
			return err
		}
		v.Merging = name
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.mergeInto(ctx, child, below, childIsHead); err != nil {
		// Nothing was renamed: clear the intent (or leave it to
		// resolveMerge if even that fails).
		s.resolveMerge(context.WithoutCancel(ctx), volume)
		return fmt.Errorf("deleting snapshot %q of volume %q: %w", name, volume, err)
	}
	pauseAt(PauseDeleteRenamed)
	return s.finishMerge(ctx, volume, name, deleted)
}

// finishMerge commits the removal of snapshot name (layer file deleted)
// of volume, whose child no longer reads it, and removes the file.
func (s *LocalStore) finishMerge(ctx context.Context, volume, name, deleted string) error {
	err := s.commit(ctx, func(m *storeMeta) error {
		v, j, err := m.snapshotLayer(volume, name)
		if err != nil {
			return err
		}
		if v.Layers[j].File != deleted {
			panic("BUG: the layers of a locked volume changed")
		}
		v.Layers = slices.Delete(v.Layers, j, j+1)
		v.Merging = ""
		return nil
	})
	if err != nil {
		// The merged child is in place and reads as before; the intent
		// stays for resolveMerge.
		return err
	}
	pauseAt(PauseDeleteCommitted)
	os.Remove(s.layerPath(deleted))
	return nil
}

// resolveMerge settles an interrupted snapshot delete of volume (see
// deleteSnapshot). The caller holds the volume lock.
func (s *LocalStore) resolveMerge(ctx context.Context, volume string) error {
	m, err := s.load()
	if err != nil {
		return err
	}
	v := m.Volumes[volume]
	if v == nil || v.Merging == "" {
		return nil
	}
	name := v.Merging
	i := v.findSnapshot(name)
	if i >= 0 {
		child := v.Head
		if i < len(v.Layers)-1 {
			child = v.Layers[i+1].File
		}
		backing, err := s.backingOf(child)
		if err != nil {
			return fmt.Errorf("volume %q: finishing the delete of snapshot %q: %w", volume, name, err)
		}
		if backing != v.Layers[i].File {
			// The merged child replaced the old one: finish.
			return s.finishMerge(ctx, volume, name, v.Layers[i].File)
		}
	}
	// The merge did not get as far as the rename: forget it.
	return s.commit(ctx, func(m *storeMeta) error {
		if v := m.Volumes[volume]; v != nil && v.Merging == name {
			v.Merging = ""
		}
		return nil
	})
}

// backingOf returns the backing file name in the header of a layer file
// ("" for none), without opening it.
func (s *LocalStore) backingOf(file string) (string, error) {
	f, err := qcow.OpenFile(s.layerPath(file))
	if err != nil {
		return "", err
	}
	var backing string
	errFound := errors.New("found")
	format := qcow.FormatQcow2
	c, err := qcow.Open(f, qcow.Options{Cache: s.cache, Format: &format, Open: func(ref qcow.BackingRef) (qcow.File, error) {
		backing = ref.Name
		return nil, errFound
	}})
	if err == nil {
		c.Close()
		return "", nil
	}
	if backing != "" {
		return backing, nil
	}
	return "", err
}

// deletable returns ErrBusy when something depends on the snapshot at
// layer i of v.
func deletable(m *storeMeta, volume string, v *volumeMeta, i int, owner string) error {
	sm := v.Layers[i].Snapshot
	if sm.Instance != "" && sm.Instance != owner {
		return fmt.Errorf("%w: snapshot %q of volume %q belongs to instance snapshot %s/%s; delete that instead",
			ErrBusy, sm.Name, volume, sm.Instance, sm.Name)
	}
	if clones := m.clonesOf(volume, sm.Name); len(clones) > 0 {
		return fmt.Errorf("%w: snapshot %q of volume %q has clones (%s); flatten them (snapfs volume flatten) or delete them first",
			ErrBusy, sm.Name, volume, strings.Join(clones, ", "))
	}
	return nil
}

// mergeInto writes a new version of the layer file child that holds its
// own clusters and those of its backing layer (the one being deleted) that
// it does not override, backed by below, and renames it over child. The
// chain child -> deleted -> below... reads the same as new child ->
// below..., so the rename changes nothing any reader can see.
func (s *LocalStore) mergeInto(ctx context.Context, child, below string, childIsHead bool) error {
	chain, err := s.openResolved(ctx, func(*storeMeta) (string, error) { return child, nil })
	if err != nil {
		return err
	}
	defer chain.Close()
	ext, err := chain.Extents(0, chain.Size())
	if err != nil {
		return err
	}
	nf, err := s.createFile(child, false)
	if err != nil {
		return err
	}
	published := false
	defer func() {
		if published {
			nf.release()
		} else {
			nf.discard()
		}
	}()
	opts := qcow.ConvertOptions{
		Format: qcow.FormatQcow2,
		// Layers 0 and 1 (the child and the deleted layer) are kept;
		// what neither allocates falls through to below.
		Delta:    qcow.ExtentsAbove(ext, 2),
		Progress: progressWithPause(ctx, PauseDeleteMerging),
	}
	if below != "" {
		opts.BackingName, opts.BackingFormat = below, "qcow2"
	}
	if err := qcow.Convert(ctx, nf.f, chain, opts); err != nil {
		return err
	}
	pauseAt(PauseDeleteMerged)
	if err := nf.publish(layerMode(childIsHead)); err != nil {
		return err
	}
	published = true
	return s.syncLayers()
}

// progressWithPause returns the progress function of ctx (see
// WithProgress), which also stops at pause point once work has begun.
func progressWithPause(ctx context.Context, point string) func(done, total int64) {
	report := ProgressFrom(ctx)
	return func(done, total int64) {
		if report != nil {
			report(done, total)
		}
		if done > 0 {
			pauseAt(point)
		}
	}
}

// OpenSnapshot implements [Backend]: the chain whose top is the snapshot's
// layer. It keeps reading the same bytes whatever happens to the store
// afterwards (deleted layers stay open, merged ones are new files).
func (s *LocalStore) OpenSnapshot(ctx context.Context, volume, name string) (qcow.Image, error) {
	return s.openResolved(ctx, func(m *storeMeta) (string, error) {
		v, i, err := m.snapshotLayer(volume, name)
		if err != nil {
			return "", err
		}
		return v.Layers[i].File, nil
	})
}

// Changed implements [Backend]: the extents of snapshot to owned by the
// layers above snapshot from's layer (what was written since), minus the
// zeroed ranges that from read as zeros already. A cluster the guest
// rewrote with the same bytes counts as changed, as in every block-level
// change tracking; comparing the data would read it all twice (see
// RefineChanged). A snapshot delete merges layers but never moves a
// cluster across from's layer, so the answer stays the same. from ""
// means everything that to allocates with data.
func (s *LocalStore) Changed(ctx context.Context, volume, from, to string) ([]qcow.Extent, error) {
	var toFile, fromFile string
	resolve := func() error {
		m, err := s.load()
		if err != nil {
			return err
		}
		v, ti, err := m.snapshotLayer(volume, to)
		if err != nil {
			return err
		}
		toFile = v.Layers[ti].File
		if from != "" {
			_, fi, err := m.snapshotLayer(volume, from)
			if err != nil {
				return err
			}
			if fi >= ti {
				return fmt.Errorf("%w: snapshot %q is not older than %q", ErrInvalid, from, to)
			}
			fromFile = v.Layers[fi].File
		}
		return nil
	}
	if from == "" {
		chain, err := s.openResolved(ctx, func(*storeMeta) (string, error) { err := resolve(); return toFile, err })
		if err != nil {
			return nil, err
		}
		defer chain.Close()
		ext, err := chain.Extents(0, chain.Size())
		if err != nil {
			return nil, err
		}
		// Against nothing: zeros are no change.
		out := []qcow.Extent{}
		for _, e := range ext {
			if e.Kind == qcow.Data {
				out = append(out, e)
			}
		}
		return out, nil
	}
	// from's chain first: once open it reads as from did, whatever
	// happens to the store; then to's, in which from's layer is found by
	// file name (a merge replaces a file by one of the same name that
	// reads the same, and may drop a layer between from and to).
	fromChain, err := s.openResolved(ctx, func(*storeMeta) (string, error) { err := resolve(); return fromFile, err })
	if err != nil {
		return nil, err
	}
	defer fromChain.Close()
	var chain *qcow.Chain
	depth := -1
	for attempt := 0; depth < 0; attempt++ {
		var names []string
		chain, names, err = s.openChainNames(toFile)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if err == nil {
			if depth = slices.Index(names, fromFile); depth < 0 {
				chain.Close()
			}
		}
		if depth < 0 {
			if attempt == 4 {
				return nil, fmt.Errorf("%w: snapshot %q of volume %q is being deleted", ErrNotFound, from, volume)
			}
			if err := resolve(); err != nil {
				return nil, err
			}
		}
	}
	defer chain.Close()
	ext, err := chain.Extents(0, chain.Size())
	if err != nil {
		return nil, err
	}
	return DropUnchangedZeros(fromChain, qcow.ExtentsAbove(ext, depth))
}
