//go:build ceph && cgo

package rbdio

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/snapshot"
)

// Clone creates volume newName, in this pool, as a copy-on-write clone of
// snapshot snap of volume vol: see CloneInto.
func (p *Pool) Clone(ctx context.Context, vol, snap, newName string) (snapshot.Volume, error) {
	return p.CloneInto(ctx, vol, snap, p, newName)
}

// CloneFrom creates volume newName in this pool as a copy-on-write clone of
// snapshot snap of volume vol of src, another pool of the same cluster:
// see CloneInto. A mount's clone gesture across its pools comes here.
// ErrUnsupported for any other backend (the local store, a pool of another
// cluster): an RBD clone's parent is an RBD snapshot of its own cluster.
func (p *Pool) CloneFrom(ctx context.Context, src snapshot.Backend, vol, snap, newName string) (snapshot.Volume, error) {
	sp, ok := src.(*Pool)
	if !ok || sp.cluster != p.cluster {
		return snapshot.Volume{}, fmt.Errorf("%w: %s clones only snapshots of pools of its own cluster, not of %s",
			snapshot.ErrUnsupported, p.Name(), src.Name())
	}
	return sp.CloneInto(ctx, vol, snap, p, newName)
}

// CloneInto creates volume newName in pool dst (this pool or another of the
// same cluster) as a copy-on-write clone of snapshot snap of volume vol
// (rbd clone): O(1), it reads through the snapshot until written. The
// clone is of format 2 (the snapshot need not be protected) when the
// cluster's require_min_compat_client is mimic or later; otherwise the
// snapshot is protected first and the clone is of format 1, which every
// client reads.
func (p *Pool) CloneInto(ctx context.Context, vol, snap string, dst *Pool, newName string) (snapshot.Volume, error) {
	if err := lookupName(vol); err != nil {
		return snapshot.Volume{}, err
	}
	if err := snapshot.CheckVolumeName(newName); err != nil {
		return snapshot.Volume{}, err
	}
	if dst.cluster != p.cluster {
		return snapshot.Volume{}, fmt.Errorf("%w: clone across clusters", snapshot.ErrUnsupported)
	}
	// The source first, then the destination: the same order whichever
	// pool clones into which, except that two pools lock independently.
	release, err := p.lockVolumes(ctx, vol)
	if err != nil {
		return snapshot.Volume{}, err
	}
	defer release()
	if dst != p || newName != vol {
		releaseDst, err := dst.lockVolumes(ctx, newName)
		if err != nil {
			return snapshot.Volume{}, err
		}
		defer releaseDst()
	}
	if img, err := dst.openImage(newName, "", false); err == nil {
		img.Close()
		return snapshot.Volume{}, fmt.Errorf("%w: volume %q", snapshot.ErrExists, newName)
	} else if !errors.Is(err, snapshot.ErrNotFound) {
		return snapshot.Volume{}, err
	}
	format, err := p.cluster.cloneFormat()
	if err != nil {
		return snapshot.Volume{}, err
	}
	parent, err := p.openImage(vol, "", format == 1)
	if err != nil {
		return snapshot.Volume{}, err
	}
	_, err = parent.GetSnapID(snap)
	if errnoOf(err) == syscall.ENOENT {
		err = fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, snap, vol)
	} else {
		err = wrap("snap info "+p.spec(vol)+"@"+snap, err)
	}
	protectedHere := false
	if err == nil && format == 1 {
		protectedHere, err = protect(parent.GetSnapshot(snap), p.spec(vol)+"@"+snap)
	}
	parent.Close()
	if err != nil {
		return snapshot.Volume{}, err
	}
	if err := p.cloneImage(vol, snap, dst, newName, format); err != nil {
		if protectedHere {
			// As it was: a snapshot left protected refuses rbd
			// snap rm with nothing to show why.
			err = errors.Join(err, p.unprotect(vol, snap))
		}
		return snapshot.Volume{}, err
	}
	// rbd clone copies the parent's image-meta: its snapfs records would be
	// ignored (they name the parent's id) but only clutter the clone.
	if img, err := dst.openImage(newName, "", true); err == nil {
		dropInherited(img)
		img.Close()
	}
	return dst.Volume(ctx, newName)
}

// cloneImage runs rbd clone of vol@snap as newName of dst, in the given
// clone format.
func (p *Pool) cloneImage(vol, snap string, dst *Pool, newName string, format uint64) error {
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionCloneFormat, format); err != nil {
		return wrap("clone options", err)
	}
	io, err := p.io()
	if err != nil {
		return err
	}
	err = rbd.CloneImage(io, vol, snap, dst.ioctx, newName, opts)
	if errnoOf(err) == syscall.EEXIST {
		return fmt.Errorf("%w: volume %q", snapshot.ErrExists, newName)
	}
	return wrap(fmt.Sprintf("clone %s@%s %s", p.spec(vol), snap, dst.spec(newName)), err)
}

// protect protects snap unless it is already, and reports whether it did.
func protect(snap *rbd.Snapshot, what string) (bool, error) {
	ok, err := snap.IsProtected()
	if err != nil {
		return false, wrap("snap info "+what, err)
	}
	if ok {
		return false, nil
	}
	if err := snap.Protect(); err != nil {
		return false, wrap("snap protect "+what, err)
	}
	return true, nil
}

// unprotect unprotects snapshot snap of vol.
func (p *Pool) unprotect(vol, snap string) error {
	img, err := p.openImage(vol, "", true)
	if err != nil {
		return err
	}
	defer img.Close()
	return wrap("snap unprotect "+p.spec(vol)+"@"+snap, img.GetSnapshot(snap).Unprotect())
}

// releases orders the Ceph releases require_min_compat_client names.
var releases = []string{"argonaut", "bobtail", "cuttlefish", "dumpling", "emperor", "firefly", "giant",
	"hammer", "infernalis", "jewel", "kraken", "luminous", "mimic", "nautilus", "octopus", "pacific",
	"quincy", "reef", "squid", "tentacle"}

// cloneFormat returns 2 when every client the cluster admits reads clone
// v2 (require_min_compat_client mimic or later), else 1.
func (c *Cluster) cloneFormat() (uint64, error) {
	out, _, err := c.conn.MonCommand([]byte(`{"prefix": "osd dump", "format": "json"}`))
	if err != nil {
		return 0, wrap("osd dump", err)
	}
	var dump struct {
		RequireMinCompatClient string `json:"require_min_compat_client"`
	}
	if err := json.Unmarshal(out, &dump); err != nil {
		return 0, fmt.Errorf("rbdio: osd dump: %w", err)
	}
	if slices.Index(releases, dump.RequireMinCompatClient) >= slices.Index(releases, "mimic") {
		return 2, nil
	}
	return 1, nil
}

// Flatten implements [snapshot.Cloner]: it copies into volume vol, a
// clone, everything it still reads from its parent, then cuts the link
// (rbd flatten). The context's progress function (snapshot.WithProgress)
// sees the objects done, in bytes, and so does Volume.Flatten of this
// process meanwhile (other processes see only the parent, until it goes).
// It is safe to interrupt (ctx, or a kill): objects copied stay, and the
// next Flatten goes on. A volume without a parent is left as it is. A full
// cluster or pool makes it time out, and the error says so.
func (p *Pool) Flatten(ctx context.Context, vol string) error {
	if err := lookupName(vol); err != nil {
		return err
	}
	release, err := p.lockVolumes(ctx, vol)
	if err != nil {
		return err
	}
	defer release()
	img, err := p.openImage(vol, "", false)
	if err != nil {
		return err
	}
	pr, err := parentOf(img)
	var objSize uint64
	if err == nil && pr != nil {
		var st *rbd.ImageInfo
		if st, err = img.Stat(); err == nil {
			objSize = st.Obj_size
		}
		err = wrap("info "+p.spec(vol), err)
	}
	img.Close()
	if err != nil || pr == nil {
		return err
	}
	io, err := p.io()
	if err != nil {
		return err
	}
	// librbd counts objects: report bytes, as every backend does.
	shown := &snapshot.Progress{Started: time.Now()}
	p.setFlatten(vol, shown)
	defer p.setFlatten(vol, nil)
	report := snapshot.ProgressFrom(ctx)
	err = flattenImage(ctx, io, vol, func(done, total int64) {
		done, total = done*int64(objSize), total*int64(objSize)
		p.mu.Lock()
		shown.Done, shown.Total = done, total
		p.mu.Unlock()
		if report != nil {
			report(done, total)
		}
	})
	if errors.Is(err, syscall.ECANCELED) && ctx.Err() != nil {
		return ctx.Err()
	}
	return p.cluster.explainTimeout(wrap("flatten "+p.spec(vol), err))
}

// setFlatten records (pr) or forgets (nil) the flatten of vol running in
// this process, for Volume.Flatten.
func (p *Pool) setFlatten(vol string, pr *snapshot.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pr == nil {
		delete(p.flattens, vol)
		return
	}
	if p.flattens == nil {
		p.flattens = map[string]*snapshot.Progress{}
	}
	p.flattens[vol] = pr
}

// flattenOf returns a copy of the progress of the flatten of vol running
// in this process, or nil.
func (p *Pool) flattenOf(vol string) *snapshot.Progress {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pr := p.flattens[vol]; pr != nil {
		c := *pr
		return &c
	}
	return nil
}

// Revert makes the head of volume vol read as snapshot snap again (rbd snap
// rollback); every snapshot is kept. The context's progress function
// (snapshot.WithProgress) sees the objects done. ErrBusy while another
// client (a VM) has the image open: rolling back under a running guest
// would corrupt it. A revert interrupted by a crash is recorded in the
// image's metadata and finished by the next access to the volume through
// snapfs; one cancelled through ctx is finished likewise.
func (p *Pool) Revert(ctx context.Context, vol, snap string) error {
	if err := lookupName(vol); err != nil {
		return err
	}
	release, err := p.lockVolumes(ctx, vol)
	if err != nil {
		return err
	}
	defer release()
	img, err := p.openImage(vol, "", true)
	if err != nil {
		return err
	}
	err = p.checkUnused(img, vol)
	var id string
	var sid uint64
	if err == nil {
		id, err = img.GetId()
		err = wrap("info "+p.spec(vol), err)
	}
	if err == nil {
		sid, err = img.GetSnapID(snap)
		if errnoOf(err) == syscall.ENOENT {
			err = fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, snap, vol)
		} else {
			err = wrap("snap info "+p.spec(vol)+"@"+snap, err)
		}
	}
	if err == nil {
		err = setMeta(img, metaRevertKey, revertMeta{Image: id, Snapshot: snap, SnapID: sid})
	}
	// Our own handle would hold the exclusive lock that the rollback's
	// handle needs: close it first.
	img.Close()
	if err != nil {
		return err
	}
	return p.rollback(ctx, vol, snap)
}

// rollback runs the rollback recorded in vol's metadata and then drops
// the record. The caller holds vol's lock and no read-write handle.
func (p *Pool) rollback(ctx context.Context, vol, snap string) error {
	io, err := p.io()
	if err != nil {
		return err
	}
	err = rollbackImage(ctx, io, vol, snap, snapshot.ProgressFrom(ctx))
	if errors.Is(err, syscall.ECANCELED) && ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return wrap("snap rollback "+p.spec(vol)+"@"+snap, err)
	}
	img, err := p.openImage(vol, "", true)
	if err != nil {
		return err
	}
	defer img.Close()
	return wrap("image-meta remove "+p.spec(vol), img.RemoveMetadata(metaRevertKey))
}

// pendingRevert returns the revert recorded in vol's metadata, or nil.
func (p *Pool) pendingRevert(vol string) (*revertMeta, error) {
	img, err := p.openImage(vol, "", false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	id, err := img.GetId()
	if err != nil {
		return nil, wrap("info "+p.spec(vol), err)
	}
	meta, err := readMeta(img, id)
	return meta.revert, err
}

// finishRevertLocked finishes a revert of vol that was interrupted, so
// that nobody sees a half-reverted head. The caller holds vol's lock and
// no read-write handle on it.
func (p *Pool) finishRevertLocked(ctx context.Context, vol string) error {
	rm, err := p.pendingRevert(vol)
	if err != nil || rm == nil {
		return err
	}
	img, err := p.openImage(vol, "", false)
	if err != nil {
		return err
	}
	sid, serr := img.GetSnapID(rm.Snapshot)
	err = p.checkUnused(img, vol)
	img.Close()
	if serr != nil || sid != rm.SnapID {
		// The snapshot is gone, or is another one now: nothing to finish.
		img, err := p.openImage(vol, "", true)
		if err != nil {
			return err
		}
		defer img.Close()
		return wrap("image-meta remove "+p.spec(vol), img.RemoveMetadata(metaRevertKey))
	}
	if err != nil {
		return fmt.Errorf("an interrupted revert of volume %q to %q must finish first: %w", vol, rm.Snapshot, err)
	}
	return p.rollback(ctx, vol, rm.Snapshot)
}

// finishRevertByName is finishRevertLocked for a reader: it takes the lock
// only when a revert is pending.
func (p *Pool) finishRevertByName(ctx context.Context, vol string) error {
	rm, err := p.pendingRevert(vol)
	if err != nil || rm == nil {
		return err
	}
	release, err := p.lockVolumes(ctx, vol)
	if err != nil {
		return err
	}
	defer release()
	return p.finishRevertLocked(ctx, vol)
}
