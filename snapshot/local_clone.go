package snapshot

// Clones, flatten and revert in the local store.
//
// A clone is a volume whose bottom layer (its first snapshot's layer, or
// its head while it has none) has for backing file the layer of a snapshot
// of another volume: volumeMeta.Parent names that snapshot. Reads walk the
// whole chain, across volumes, in one qcow.Chain.
//
// Flatten rewrites the bottom layer as a standalone file that holds what
// the chain below it read, renames it over the old one (every reader sees
// the same bytes before and after), then drops Parent. Revert writes a new
// head and switches to it in one commit. Both are ordered like the other
// mutations (see local.go): after a kill -9 the store reads as before or
// as after, and settle finishes or forgets what a crash cut short.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"snapfs/qcow"
)

var (
	_ Cloner   = (*LocalStore)(nil)
	_ Reverter = (*LocalStore)(nil)
)

// flattenProgressEvery is how often a running flatten records its
// progress in store.json, where every process sees it (Volume.Flatten).
// A commit costs two fsyncs: once a second is nothing next to the copy.
// A variable, so that a test can see progress without a long copy.
var flattenProgressEvery = time.Second

// Clone implements [Cloner]: see CloneVolume.
func (s *LocalStore) Clone(ctx context.Context, volume, snapshot, newName string) (Volume, error) {
	return s.CloneVolume(ctx, newName, SnapshotRef{Volume: volume, Snapshot: snapshot})
}

// CloneVolume creates volume name as a copy-on-write clone of a snapshot:
// an empty head whose backing file is the snapshot's layer. O(1); the
// clone reads through its parent until written, and the parent snapshot
// cannot be deleted while the clone exists.
func (s *LocalStore) CloneVolume(ctx context.Context, name string, parent SnapshotRef) (Volume, error) {
	if err := CheckVolumeName(name); err != nil {
		return Volume{}, err
	}
	release, err := s.lockVolumes(ctx, name, parent.Volume)
	if err != nil {
		return Volume{}, err
	}
	defer release()
	if err := s.settle(ctx, parent.Volume); err != nil {
		return Volume{}, err
	}
	m, err := s.load()
	if err != nil {
		return Volume{}, err
	}
	if m.Volumes[name] != nil {
		return Volume{}, fmt.Errorf("%w: volume %q", ErrExists, name)
	}
	pv, pi, err := m.snapshotLayer(parent.Volume, parent.Snapshot)
	if err != nil {
		return Volume{}, err
	}
	if depth := 1 + len(m.chainBelow(pv, pi)); depth > qcow.DefaultMaxDepth {
		return Volume{}, fmt.Errorf("%w: the clone would have %d layers, more than the %d a chain may have",
			ErrUnsupported, depth, qcow.DefaultMaxDepth)
	}
	head, err := s.createFile(newLayerName(), true)
	if err != nil {
		return Volume{}, err
	}
	err = qcow.CreateOverlay(head.f, pv.Size, 0, pv.Layers[pi].File, "qcow2")
	if err == nil {
		err = head.publish(layerMode(true))
	}
	if err == nil {
		err = s.syncLayers()
	}
	if err == nil {
		err = s.commit(ctx, func(m *storeMeta) error {
			if m.Volumes[name] != nil {
				return fmt.Errorf("%w: volume %q", ErrExists, name)
			}
			pv, pi, err := m.snapshotLayer(parent.Volume, parent.Snapshot)
			if err != nil {
				return err
			}
			if sm := pv.Layers[pi].Snapshot; pv.Merging == sm.Name || sm.Instance != "" && m.instanceSnapshotDeleting(sm.Instance, sm.Name) {
				return fmt.Errorf("%w: snapshot %q of volume %q is being deleted", ErrNotFound, parent.Snapshot, parent.Volume)
			}
			p := parent
			m.Volumes[name] = &volumeMeta{Created: now(), Size: pv.Size, Parent: &p, Head: filepath.Base(head.final)}
			return nil
		})
	}
	if err != nil {
		head.discard()
		return Volume{}, err
	}
	head.release()
	return s.Volume(ctx, name)
}

// settle finishes or forgets what a crash (or an error) left half done on
// volume: an external head switch (resolveExternal), a snapshot delete
// (resolveMerge) and a flatten (resolveFlatten). The caller holds the
// volume lock.
func (s *LocalStore) settle(ctx context.Context, volume string) error {
	if err := s.resolveExternal(ctx, volume); err != nil {
		return err
	}
	if err := s.resolveMerge(ctx, volume); err != nil {
		return err
	}
	return s.resolveFlatten(ctx, volume)
}

// bottomLayer returns the file of v's bottom layer, the one whose backing
// file is the parent snapshot's layer in a clone, and whether it is the
// head.
func (v *volumeMeta) bottomLayer() (file string, isHead bool) {
	if len(v.Layers) == 0 {
		return v.Head, true
	}
	return v.Layers[0].File, false
}

// Flatten implements [Cloner]. The steps, each safe to interrupt:
//  1. commit the mark (volumeMeta.Flatten), which also carries the
//     progress that Volume.Flatten shows;
//  2. write a standalone copy of the bottom layer as it reads with its
//     backing chain (its own clusters and everything below them), and
//     rename it over the bottom layer: every image reads as before;
//  3. commit Parent = nil and clear the mark.
//
// After a crash, settle (run by OpenLocal and before the next mutation of
// the volume) looks at the bottom layer's backing file: none means step 2
// was done, and it finishes step 3; otherwise it clears the mark. The copy
// costs all the data the clone reads; the volume stays readable (and its
// snapshots usable) meanwhile, and mutations of it wait. ErrBusy when the
// clone has no snapshot and qemu has its head (the bottom layer) open.
func (s *LocalStore) Flatten(ctx context.Context, volume string) error {
	release, err := s.lockVolumes(ctx, volume)
	if err != nil {
		return err
	}
	defer release()
	if err := s.settle(ctx, volume); err != nil {
		return err
	}
	m, err := s.load()
	if err != nil {
		return err
	}
	v, err := m.volume(volume)
	if err != nil {
		return err
	}
	if v.Parent == nil {
		return nil
	}
	bottom, isHead := v.bottomLayer()
	if isHead {
		if err := s.headFree(volume, v); err != nil {
			return err
		}
	}
	started := now()
	setProgress := func(done, total int64) func(m *storeMeta) error {
		return func(m *storeMeta) error {
			v, err := m.volume(volume)
			if err != nil {
				return err
			}
			v.Flatten = &Progress{Done: done, Total: total, Started: started}
			return nil
		}
	}
	if err := s.commit(ctx, setProgress(0, 0)); err != nil {
		return err
	}
	if err := s.flattenInto(ctx, bottom, isHead, setProgress); err != nil {
		// Renamed or not, the mark tells settle what to do.
		if serr := s.resolveFlatten(context.WithoutCancel(ctx), volume); serr != nil {
			err = fmt.Errorf("%w (and settling: %v)", err, serr)
		}
		return fmt.Errorf("flattening volume %q: %w", volume, err)
	}
	pauseAt(PauseFlattenRenamed)
	return s.finishFlatten(ctx, volume)
}

// flattenInto writes a standalone version of the layer file bottom, as it
// reads with its whole backing chain, and renames it over bottom. The
// progress is reported to the context's function at once, and recorded
// in the metadata (through record) every flattenProgressEvery.
func (s *LocalStore) flattenInto(ctx context.Context, bottom string, isHead bool,
	record func(done, total int64) func(*storeMeta) error) error {
	chain, err := s.openResolved(ctx, func(*storeMeta) (string, error) { return bottom, nil })
	if err != nil {
		return err
	}
	defer chain.Close()
	nf, err := s.createFile(bottom, false)
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

	var done, total atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(flattenProgressEvery)
		defer tick.Stop()
		last := int64(0)
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if d := done.Load(); d != last {
					last = d
					// Progress only: a failed commit is retried at the
					// next tick, and the copy goes on.
					s.commit(ctx, record(d, total.Load()))
				}
			}
		}
	}()
	report := progressWithPause(ctx, PauseFlattenCopying)
	err = qcow.Convert(ctx, nf.f, chain, qcow.ConvertOptions{
		Format: qcow.FormatQcow2,
		Progress: func(d, t int64) {
			total.Store(t)
			for {
				old := done.Load()
				if d <= old || done.CompareAndSwap(old, d) {
					break
				}
			}
			report(d, t)
		},
	})
	close(stop)
	wg.Wait()
	if err != nil {
		return err
	}
	pauseAt(PauseFlattenCopied)
	if err := nf.publish(layerMode(isHead)); err != nil {
		return err
	}
	published = true
	return s.syncLayers()
}

// finishFlatten commits the end of a flatten whose bottom layer is in
// place: the volume no longer has a parent.
func (s *LocalStore) finishFlatten(ctx context.Context, volume string) error {
	return s.commit(ctx, func(m *storeMeta) error {
		v, err := m.volume(volume)
		if err != nil {
			return err
		}
		v.Parent, v.Flatten = nil, nil
		return nil
	})
}

// resolveFlatten settles a flatten of volume that stopped before its last
// commit (see Flatten). The caller holds the volume lock.
func (s *LocalStore) resolveFlatten(ctx context.Context, volume string) error {
	m, err := s.load()
	if err != nil {
		return err
	}
	v := m.Volumes[volume]
	if v == nil || v.Flatten == nil {
		return nil
	}
	if v.Parent != nil {
		bottom, _ := v.bottomLayer()
		backing, err := s.backingOf(bottom)
		if err != nil {
			return fmt.Errorf("volume %q: settling an interrupted flatten: %w", volume, err)
		}
		if backing == "" {
			// The standalone bottom layer is in place.
			return s.finishFlatten(ctx, volume)
		}
	}
	return s.commit(ctx, func(m *storeMeta) error {
		if v := m.Volumes[volume]; v != nil {
			v.Flatten = nil
		}
		return nil
	})
}

// Revert implements [Reverter]. A new head is written and replaces the
// old one in one commit; the old head's file is then removed. Reverting to
// the newest snapshot is O(1): the new head is an empty overlay on its
// layer. Reverting to an older snapshot S keeps every snapshot and the
// chain as it is: the new head, on top of the newest layer, holds S's
// content for the ranges that the layers above S changed (data, or zero
// clusters), so it costs a copy of what changed since S, as rbd snap
// rollback does. ErrBusy while qemu has the head open: a VM must not have
// its disk switched under it.
func (s *LocalStore) Revert(ctx context.Context, volume, snapshot string) error {
	release, _, v, i, err := s.lockSnapshot(ctx, volume, snapshot)
	if err != nil {
		return err
	}
	defer release()
	if err := s.headFree(volume, v); err != nil {
		return err
	}
	last := len(v.Layers) - 1
	top, oldHead := v.Layers[last].File, v.Head

	nf, err := s.createFile(newLayerName(), true)
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if committed {
			nf.release()
		} else {
			nf.discard()
		}
	}()
	if i == last {
		err = qcow.CreateOverlay(nf.f, v.Size, 0, top, "qcow2")
	} else {
		err = s.writeRevertHead(ctx, nf.f, top, last-i, v.Layers[i].File)
	}
	if err != nil {
		return fmt.Errorf("reverting volume %q to %q: %w", volume, snapshot, err)
	}
	if err := nf.publish(layerMode(true)); err != nil {
		return err
	}
	if err := s.syncLayers(); err != nil {
		return err
	}
	pauseAt(PauseRevertWritten)
	err = s.commit(ctx, func(m *storeMeta) error {
		v, j, err := m.snapshotLayer(volume, snapshot)
		if err != nil {
			return err
		}
		if j != i || v.Head != oldHead || len(v.Layers)-1 != last {
			panic("BUG: the layers of a locked volume changed")
		}
		v.Head = filepath.Base(nf.final)
		return nil
	})
	if err != nil {
		return err
	}
	committed = true
	pauseAt(PauseRevertCommitted)
	os.Remove(s.layerPath(oldHead))
	return nil
}

// writeRevertHead writes to dst an overlay on the layer file top that
// reads as the snapshot whose layer is target, depth layers below top:
// for every range that the layers above target own in top's chain, the
// overlay holds what target's chain reads (data, or a zero cluster that
// hides top's data); everything else reads the same in both and falls
// through to top.
func (s *LocalStore) writeRevertHead(ctx context.Context, dst *os.File, top string, depth int, target string) error {
	topChain, err := s.openResolved(ctx, func(*storeMeta) (string, error) { return top, nil })
	if err != nil {
		return err
	}
	ext, err := topChain.Extents(0, topChain.Size())
	topChain.Close()
	if err != nil {
		return err
	}
	changed := qcow.ExtentsAbove(ext, depth)
	want, err := s.openResolved(ctx, func(*storeMeta) (string, error) { return target, nil })
	if err != nil {
		return err
	}
	defer want.Close()
	delta := []qcow.Extent{} // not nil: nil would mean all of want
	for _, c := range changed {
		old, err := want.Extents(c.Offset, c.Length)
		if err != nil {
			return err
		}
		for _, e := range old {
			if e.Kind != qcow.Data {
				e.Kind = qcow.Zero // unallocated at the bottom reads zeros too
			}
			delta = append(delta, e)
		}
	}
	return qcow.Convert(ctx, dst, want, qcow.ConvertOptions{
		Format:        qcow.FormatQcow2,
		Delta:         delta,
		BackingName:   top,
		BackingFormat: "qcow2",
		Progress:      progressWithPause(ctx, PauseRevertCopying),
	})
}
