//go:build ceph && cgo

package rbdio

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// ListSnapshots implements [snapshot.Backend]: the user snapshots of the
// image whose names snapfs can show, oldest first. Each one's parent is the
// one before it.
func (p *Pool) ListSnapshots(ctx context.Context, volume string) ([]snapshot.Snapshot, error) {
	if err := lookupName(volume); err != nil {
		return nil, err
	}
	img, err := p.openImage(volume, "", false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	return p.snapshots(img, volume)
}

// snapshots describes the snapshots of img (volume).
func (p *Pool) snapshots(img *rbd.Image, volume string) ([]snapshot.Snapshot, error) {
	id, err := img.GetId()
	if err != nil {
		return nil, wrap("info "+p.spec(volume), err)
	}
	meta, err := readMeta(img, id)
	if err != nil {
		return nil, err
	}
	snaps, err := listSnaps(img)
	if err != nil {
		return nil, wrap("snap ls "+p.spec(volume), err)
	}
	out := []snapshot.Snapshot{}
	prev := ""
	for _, s := range snaps {
		if snapshot.CheckSnapshotName(s.Name) != nil {
			continue
		}
		ts, err := img.GetSnapTimestamp(s.Id)
		if err != nil {
			return nil, wrap("snap ls "+p.spec(volume), err)
		}
		sm, ok := meta.snaps[s.Id]
		if !ok {
			// Taken by another tool (rbd snap create): RBD makes one
			// image's snapshot at one instant, but nothing says more.
			sm.Consistency = snapshot.None
		}
		clones, err := p.clonesOf(img, volume, s)
		if err != nil {
			return nil, err
		}
		out = append(out, snapshot.Snapshot{
			Clones:      clones,
			Volume:      volume,
			Name:        s.Name,
			Created:     time.Unix(ts.Sec, ts.Nsec),
			Size:        int64(s.Size),
			Parent:      prev,
			Consistency: sm.Consistency,
			Method:      sm.Method,
			Metadata:    copyMetadata(sm.Metadata),
			Path:        "rbd:" + p.spec(volume) + "@" + s.Name,
		})
		prev = s.Name
	}
	return out, nil
}

// clonesOf returns the volumes cloned from snapshot s of img (volume),
// sorted, as Snapshot.Clones names them (POOL/IMAGE in another pool), or
// nil. It leaves img at its head.
//
// librbd looks for format-1 clones in every pool of the cluster, and for
// clones it must open in their pools: a client whose caps name only some
// pools (osd 'profile rbd pool=P', the usual restricted client) is refused
// there. The clones are then not named (nil), so that such a client still
// lists and reads its snapshots; a snapshot delete checks again
// (checkNoClones), and fails rather than orphan a clone it cannot see.
func (p *Pool) clonesOf(img *rbd.Image, volume string, s rbd.SnapInfo) ([]string, error) {
	if err := img.SetSnapByID(s.Id); err != nil {
		return nil, wrap("snap set "+p.spec(volume)+"@"+s.Name, err)
	}
	children, err := img.ListChildrenAttributes()
	img.SetSnapByID(noSnap)
	if err != nil {
		if denied(err) {
			return nil, nil
		}
		return nil, wrap("children "+p.spec(volume)+"@"+s.Name, err)
	}
	var names []string
	for _, c := range children {
		if !c.Trash {
			names = append(names, p.refName(c.PoolName, c.ImageName))
		}
	}
	slices.Sort(names)
	return names, nil
}

// Snapshot implements [snapshot.Backend].
func (p *Pool) Snapshot(ctx context.Context, volume, name string) (snapshot.Snapshot, error) {
	all, err := p.ListSnapshots(ctx, volume)
	if err != nil {
		return snapshot.Snapshot{}, err
	}
	for _, s := range all {
		if s.Name == name {
			return s, nil
		}
	}
	return snapshot.Snapshot{}, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, name, volume)
}

// checkConsistency refuses unknown consistency levels ("" is allowed: the
// backend says what it achieved).
func checkConsistency(c snapshot.Consistency) error {
	switch c {
	case "", snapshot.Quiesced, snapshot.CrashConsistent, snapshot.None:
		return nil
	}
	return fmt.Errorf("%w: consistency %q: want %s, %s or %s", snapshot.ErrInvalid, c,
		snapshot.Quiesced, snapshot.CrashConsistent, snapshot.None)
}

// CreateSnapshots implements [snapshot.Backend] with rbd snap create on
// each image, O(1) whatever the size. One image is snapped at one instant
// (librbd quiesces the image's writer around it). Several are snapped one
// after the other, and the consistency recorded is what that achieved: if
// no other client had any of the images open before the first and after
// the last, nothing wrote in between (crash-consistent, MethodIdle);
// otherwise only the caller can say (it froze the guest: opts.Consistency
// Quiesced) and the default is None (MethodSequential). A consistency of
// CrashConsistent asked for is recorded only when it was achieved. The
// snapshots exist all or none: on an error, those made are removed.
func (p *Pool) CreateSnapshots(ctx context.Context, volumes []string, name string, opts snapshot.SnapshotOptions) ([]snapshot.Snapshot, error) {
	if err := snapshot.CheckNewSnapshotName(name); err != nil {
		return nil, err
	}
	if len(volumes) == 0 {
		return nil, fmt.Errorf("%w: no volume to snapshot", snapshot.ErrInvalid)
	}
	seen := map[string]bool{}
	for _, v := range volumes {
		if seen[v] {
			return nil, fmt.Errorf("%w: volume %q given twice", snapshot.ErrInvalid, v)
		}
		seen[v] = true
		if err := lookupName(v); err != nil {
			return nil, err
		}
	}
	if err := checkMetadata(opts.Metadata); err != nil {
		return nil, err
	}
	if err := checkConsistency(opts.Consistency); err != nil {
		return nil, err
	}
	release, err := p.lockVolumes(ctx, volumes...)
	if err != nil {
		return nil, err
	}
	defer release()

	imgs := make([]*rbd.Image, len(volumes))
	ids := make([]string, len(volumes))
	defer func() {
		for _, img := range imgs {
			if img != nil {
				img.Close()
			}
		}
	}()
	for i, v := range volumes {
		if err := p.finishRevertLocked(ctx, v); err != nil {
			return nil, err
		}
		img, err := p.openImage(v, "", true)
		if err != nil {
			return nil, err
		}
		imgs[i] = img
		if ids[i], err = img.GetId(); err != nil {
			return nil, wrap("info "+p.spec(v), err)
		}
		if _, err := img.GetSnapID(name); err == nil {
			return nil, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrExists, name, v)
		}
	}

	method := MethodSingle
	if len(imgs) > 1 {
		method = MethodIdle
		if busy, err := p.anyForeign(imgs); err != nil {
			return nil, err
		} else if busy {
			method = MethodSequential
		}
	}
	var made []int
	undo := func() {
		for _, i := range made {
			imgs[i].GetSnapshot(name).Remove()
		}
	}
	for i, img := range imgs {
		if err := ctx.Err(); err != nil {
			undo()
			return nil, err
		}
		if _, err := img.CreateSnapshot(name); err != nil {
			undo()
			if errnoOf(err) == syscall.EEXIST {
				return nil, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrExists, name, volumes[i])
			}
			return nil, wrap("snap create "+p.spec(volumes[i])+"@"+name, err)
		}
		made = append(made, i)
	}
	if method == MethodIdle {
		if busy, err := p.anyForeign(imgs); err != nil {
			undo()
			return nil, err
		} else if busy {
			method = MethodSequential
		}
	}
	consistency := opts.Consistency
	if consistency == "" || consistency == snapshot.CrashConsistent {
		consistency = snapshot.CrashConsistent
		if method == MethodSequential {
			consistency = snapshot.None
		}
	}
	for i, img := range imgs {
		sid, err := img.GetSnapID(name)
		if err == nil {
			err = setMeta(img, snapKey(sid), snapMeta{
				Image: ids[i], Consistency: consistency, Method: method, Metadata: copyMetadata(opts.Metadata),
			})
		} else {
			err = wrap("snap info "+p.spec(volumes[i])+"@"+name, err)
		}
		if err != nil {
			undo()
			return nil, err
		}
	}
	out := make([]snapshot.Snapshot, 0, len(volumes))
	for i, v := range volumes {
		all, err := p.snapshots(imgs[i], v)
		if err != nil {
			return nil, err
		}
		for _, s := range all {
			if s.Name == name {
				out = append(out, s)
			}
		}
	}
	return out, nil
}

// anyForeign reports whether another client has any of imgs open.
func (p *Pool) anyForeign(imgs []*rbd.Image) (bool, error) {
	for _, img := range imgs {
		ws, err := p.foreignWatchers(img)
		if err != nil {
			return false, err
		}
		if len(ws) > 0 {
			return true, nil
		}
	}
	return false, nil
}

// DeleteSnapshot implements [snapshot.Backend] with rbd snap rm (RBD
// keeps what later snapshots and the head need by itself). ErrBusy while
// clones depend on the snapshot (rbd would move it to the trash namespace
// and keep it for them: snapfs refuses instead, and names the clones); a
// protected snapshot without clones is unprotected first.
func (p *Pool) DeleteSnapshot(ctx context.Context, volume, name string) error {
	if err := lookupName(volume); err != nil {
		return err
	}
	release, err := p.lockVolumes(ctx, volume)
	if err != nil {
		return err
	}
	defer release()
	if err := p.finishRevertLocked(ctx, volume); err != nil {
		return err
	}
	img, err := p.openImage(volume, "", true)
	if err != nil {
		return err
	}
	defer img.Close()
	sid, err := img.GetSnapID(name)
	if errnoOf(err) == syscall.ENOENT {
		return fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, name, volume)
	}
	if err != nil {
		return wrap("snap info "+p.spec(volume)+"@"+name, err)
	}
	if err := p.checkNoClones(img, volume, rbd.SnapInfo{Id: sid, Name: name}); err != nil {
		return err
	}
	if deferred, err := p.deferRemoval(img, volume, name, sid); deferred || err != nil {
		return err
	}
	if err := p.removeSnap(img, volume, name); err != nil {
		return err
	}
	p.sweepHidden(img, volume)
	return nil
}

// checkNoClones returns ErrBusy, naming them, when images are cloned from
// snapshot s of img (volume). It leaves img at its head.
func (p *Pool) checkNoClones(img *rbd.Image, volume string, s rbd.SnapInfo) error {
	if err := img.SetSnapByID(s.Id); err != nil {
		return wrap("snap set "+p.spec(volume)+"@"+s.Name, err)
	}
	children, err := img.ListChildrenAttributes()
	img.SetSnapByID(noSnap)
	if denied(err) {
		return fmt.Errorf("%w: snapshot %q of volume %q: this client may not look for its clones, which needs read access to every pool of the cluster (rbd children)",
			wrap("children "+p.spec(volume)+"@"+s.Name, err), s.Name, volume)
	}
	if err != nil {
		return wrap("children "+p.spec(volume)+"@"+s.Name, err)
	}
	if len(children) == 0 {
		return nil
	}
	names := make([]string, 0, len(children))
	for _, c := range children {
		n := c.PoolName + "/" + c.ImageName
		if c.Trash {
			n += " (in the RBD trash)"
		}
		names = append(names, n)
	}
	slices.Sort(names)
	return fmt.Errorf("%w: snapshot %q of volume %q has clones: %s; flatten or delete them first",
		snapshot.ErrBusy, s.Name, volume, strings.Join(names, ", "))
}

// removeSnap unprotects (if need be) and removes snapshot name of img,
// open read-write, and drops its snapfs record.
func (p *Pool) removeSnap(img *rbd.Image, volume, name string) error {
	what := p.spec(volume) + "@" + name
	sid, err := img.GetSnapID(name)
	if err != nil {
		return wrap("snap info "+what, err)
	}
	snap := img.GetSnapshot(name)
	protected, err := snap.IsProtected()
	if err != nil {
		return wrap("snap info "+what, err)
	}
	if protected {
		if err := snap.Unprotect(); err != nil {
			if errnoOf(err) == syscall.EBUSY {
				return fmt.Errorf("%w: snapshot %q of volume %q is protected and has clones", snapshot.ErrBusy, name, volume)
			}
			return wrap("snap unprotect "+what, err)
		}
	}
	if err := snap.Remove(); err != nil {
		return wrap("snap rm "+what, err)
	}
	// The record is only a label of the snapshot, keyed by an id RBD never
	// reuses: one left behind (an error here) is ignored by readMeta's
	// callers, which look records up by the ids that exist.
	img.RemoveMetadata(snapKey(sid))
	return nil
}

// Changed implements [snapshot.Backend] with diff-iterate, as rbd diff
// --from-snap FROM VOLUME@TO does: the extents of to that differ from
// from, Data where they hold data in to and Zero where they were
// discarded. Extents within objects that existed in from are exact; new
// objects show as (nearly) whole objects. from "" means everything to
// holds, its clone parents' data included.
func (p *Pool) Changed(ctx context.Context, volume, from, to string) ([]qcow.Extent, error) {
	if err := lookupName(volume); err != nil {
		return nil, err
	}
	img, err := p.openImage(volume, to, false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	if from != "" {
		fromID, err := img.GetSnapID(from)
		if errnoOf(err) == syscall.ENOENT {
			return nil, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, from, volume)
		}
		if err != nil {
			return nil, wrap("snap info "+p.spec(volume)+"@"+from, err)
		}
		toID, err := img.GetSnapID(to)
		if err != nil {
			return nil, wrap("snap info "+p.spec(volume)+"@"+to, err)
		}
		if fromID >= toID {
			return nil, fmt.Errorf("%w: snapshot %q is not older than %q", snapshot.ErrInvalid, from, to)
		}
	}
	size, err := img.GetSize()
	if err != nil {
		return nil, wrap("info "+p.spec(volume)+"@"+to, err)
	}
	var out []qcow.Extent
	err = img.DiffIterate(rbd.DiffIterateConfig{
		SnapName: from, Offset: 0, Length: size,
		IncludeParent: rbd.IncludeParent, WholeObject: rbd.DisableWholeObject,
		Callback: func(off, length uint64, exists int, _ any) int {
			kind := qcow.Zero
			if exists != 0 {
				kind = qcow.Data
			}
			out = append(out, qcow.Extent{Offset: int64(off), Length: int64(length), Kind: kind})
			return 0
		},
	})
	if err != nil {
		return nil, wrap("diff "+p.spec(volume)+"@"+to, err)
	}
	return mergeExtents(out), nil
}

// mergeExtents sorts extents and merges touching ones of the same kind and
// layer. Overlaps do not happen (librbd reports each range once).
func mergeExtents(ext []qcow.Extent) []qcow.Extent {
	slices.SortFunc(ext, func(a, b qcow.Extent) int {
		switch {
		case a.Offset < b.Offset:
			return -1
		case a.Offset > b.Offset:
			return 1
		}
		return 0
	})
	out := []qcow.Extent{}
	for _, e := range ext {
		if e.Length <= 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End() == e.Offset && out[n-1].Kind == e.Kind && out[n-1].Layer == e.Layer {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}
