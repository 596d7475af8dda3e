//go:build ceph && cgo

package rbdio

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"snapfs/snapshot"
)

// Pool is one RADOS pool of RBD images as a [snapshot.Backend]: its images
// are the volumes, their snapshots the snapshots.
type Pool struct {
	cluster *Cluster
	name    string
	ioctx   *rados.IOContext

	mu       sync.Mutex // protects locks, flattens
	locks    map[string]*volumeLock
	flattens map[string]*snapshot.Progress // by volume: see Flatten

	useMu  sync.Mutex             // protects users, doomed (snapuse.go)
	users  map[snapUse]int        // images of this process open at a snapshot
	doomed map[snapUse]hiddenSnap // snapshots deleted while open here

	// importing holds the temp images of this process's imports (keys:
	// names), which the sweep leaves alone: between its creation and its
	// open, nobody watches one yet.
	importing sync.Map
}

// volumeLock serialises the mutations of one volume in this process.
type volumeLock struct {
	mu   sync.Mutex
	refs int // goroutines holding or waiting for mu; guarded by Pool.mu
}

var (
	_ snapshot.Backend         = (*Pool)(nil)
	_ snapshot.Cloner          = (*Pool)(nil)
	_ snapshot.Reverter        = (*Pool)(nil)
	_ snapshot.SnapshotChecker = (*Pool)(nil)
)

// tempPrefix starts the names of the images an import writes before it
// renames them into place, and deletingPrefix those of volumes being
// deleted: renamed first, then emptied. The leading '.' keeps both out of
// ListVolumes (no volume name may start with '.'); an image of either kind
// that no client watches has lost its owner, and the next Open removes it
// (sweep).
const (
	tempPrefix     = ".snapfs-import-"
	deletingPrefix = ".snapfs-deleting-"
)

// tempName returns a new image name that starts with prefix.
func tempName(prefix string) string {
	var rnd [8]byte
	rand.Read(rnd[:])
	return prefix + hex.EncodeToString(rnd[:])
}

// noSnap is CEPH_NOSNAP, the snapshot id of an image's head.
const noSnap = ^uint64(1)

// maxChain bounds the clone chains followed: RBD has no limit of its own,
// and a chain that deep is a loop or a mistake.
const maxChain = 256

// Name implements [snapshot.Backend]: "rbd:POOL".
func (p *Pool) Name() string { return "rbd:" + p.name }

// PoolName returns the name of the RADOS pool.
func (p *Pool) PoolName() string { return p.name }

// io returns the pool's I/O context, or an error once the cluster is
// closed (librados would crash).
func (p *Pool) io() (*rados.IOContext, error) {
	if p.cluster.closed.Load() {
		return nil, errClosedCluster
	}
	return p.ioctx, nil
}

// spec returns "POOL/IMAGE", as rbd names an image.
func (p *Pool) spec(image string) string { return p.name + "/" + image }

// lockVolumes locks the named volumes for a mutation, in sorted order so
// that two callers never deadlock, and returns the function that unlocks
// them. Only this process is serialised: RBD's own operations are atomic
// against other clients.
func (p *Pool) lockVolumes(ctx context.Context, names ...string) (release func(), err error) {
	sorted := slices.Clone(names)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	p.mu.Lock()
	if p.locks == nil {
		p.locks = map[string]*volumeLock{}
	}
	held := make([]*volumeLock, len(sorted))
	for i, n := range sorted {
		l := p.locks[n]
		if l == nil {
			l = &volumeLock{}
			p.locks[n] = l
		}
		l.refs++
		held[i] = l
	}
	p.mu.Unlock()
	unref := func(from int) {
		p.mu.Lock()
		for i := from; i < len(held); i++ {
			if held[i].refs--; held[i].refs == 0 {
				delete(p.locks, sorted[i])
			}
		}
		p.mu.Unlock()
	}
	for i, l := range held {
		if err := ctx.Err(); err != nil {
			for j := range i {
				held[j].mu.Unlock()
			}
			unref(0)
			return nil, err
		}
		l.mu.Lock()
	}
	return func() {
		for _, l := range held {
			l.mu.Unlock()
		}
		unref(0)
	}, nil
}

// openImage opens image name read-only (at snapshot snap when it is not
// ""), or read-write at its head. Read-only opens take no lock and
// register no watch, so they disturb no writer.
func (p *Pool) openImage(name, snap string, writable bool) (*rbd.Image, error) {
	io, err := p.io()
	if err != nil {
		return nil, err
	}
	var img *rbd.Image
	if writable {
		img, err = rbd.OpenImage(io, name, rbd.NoSnapshot)
	} else {
		img, err = rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
	}
	if err != nil {
		if errnoOf(err) == syscall.ENOENT {
			return nil, fmt.Errorf("%w: volume %q (image %s)", snapshot.ErrNotFound, name, p.spec(name))
		}
		return nil, wrap("open "+p.spec(name), err)
	}
	if snap != "" {
		if err := img.SetSnapshot(snap); err != nil {
			img.Close()
			if errnoOf(err) == syscall.ENOENT {
				return nil, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, snap, name)
			}
			return nil, wrap("snap set "+p.spec(name)+"@"+snap, err)
		}
	}
	return img, nil
}

// lookupName refuses names snapfs does not show: they are not found.
func lookupName(name string) error {
	if err := snapshot.CheckVolumeName(name); err != nil {
		return fmt.Errorf("%w: volume %q", snapshot.ErrNotFound, name)
	}
	return nil
}

// ListVolumes implements [snapshot.Backend]: the images whose names can
// be volume names, sorted.
func (p *Pool) ListVolumes(ctx context.Context) ([]snapshot.Volume, error) {
	io, err := p.io()
	if err != nil {
		return nil, err
	}
	names, err := rbd.GetImageNames(io)
	if err != nil {
		return nil, wrap("ls "+p.name, err)
	}
	slices.Sort(names)
	out := []snapshot.Volume{}
	for _, name := range names {
		if snapshot.CheckVolumeName(name) != nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		v, err := p.Volume(ctx, name)
		if errors.Is(err, snapshot.ErrNotFound) {
			continue // removed since the listing
		}
		if denied(err) {
			// A clone whose parent is in a pool this client may not
			// read: librbd cannot open it. As rbd ls -l, list the
			// others; a lookup of this one says why it fails.
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Volume implements [snapshot.Backend]. Size and creation time come from
// RBD; BytesUsed is what `rbd du` shows as used: the objects of the head
// and of every snapshot, not counting the parent's; Chain lists the head
// and the snapshots of the clone chain as qemu names them
// ("rbd:POOL/IMAGE", "rbd:POOL/PARENT@SNAP", ...).
func (p *Pool) Volume(ctx context.Context, name string) (snapshot.Volume, error) {
	if err := lookupName(name); err != nil {
		return snapshot.Volume{}, err
	}
	img, err := p.openImage(name, "", false)
	if err != nil {
		return snapshot.Volume{}, err
	}
	defer img.Close()
	return p.describe(img, name)
}

// describe makes the Volume of img, open read-only at its head.
func (p *Pool) describe(img *rbd.Image, name string) (snapshot.Volume, error) {
	id, err := img.GetId()
	if err != nil {
		return snapshot.Volume{}, wrap("info "+p.spec(name), err)
	}
	size, err := img.GetSize()
	if err != nil {
		return snapshot.Volume{}, wrap("info "+p.spec(name), err)
	}
	ts, err := img.GetCreateTimestamp()
	if err != nil {
		return snapshot.Volume{}, wrap("info "+p.spec(name), err)
	}
	meta, err := readMeta(img, id)
	if err != nil {
		return snapshot.Volume{}, err
	}
	snaps, err := listSnaps(img)
	if err != nil {
		return snapshot.Volume{}, wrap("snap ls "+p.spec(name), err)
	}
	v := snapshot.Volume{
		Name:     name,
		Size:     int64(size),
		Created:  time.Unix(ts.Sec, ts.Nsec),
		HeadPath: "rbd:" + p.spec(name),
		Metadata: copyMetadata(meta.volume.Metadata),
		Chain:    []string{"rbd:" + p.spec(name)},
		Flatten:  p.flattenOf(name),
	}
	v.BytesUsed, err = usedBytes(img, snaps)
	if err != nil {
		return snapshot.Volume{}, wrap("du "+p.spec(name), err)
	}
	parents, err := p.parentChain(img)
	if err != nil {
		return snapshot.Volume{}, fmt.Errorf("volume %q: %w", name, err)
	}
	if len(parents) > 0 {
		v.Parent = &snapshot.SnapshotRef{Volume: p.refName(parents[0].pool, parents[0].image), Snapshot: parents[0].snap}
	}
	for _, pr := range parents {
		v.Chain = append(v.Chain, "rbd:"+pr.pool+"/"+pr.image+"@"+pr.snap)
	}
	return v, nil
}

// refName names image of pool in a SnapshotRef: bare in this pool,
// "POOL/IMAGE" in another ('/' is in no volume name, so the two never
// clash).
func (p *Pool) refName(pool, image string) string {
	if pool == p.name {
		return image
	}
	return pool + "/" + image
}

// parentRef is one parent of a clone chain.
type parentRef struct {
	pool, namespace, image, imageID, snap string
	snapID                                uint64
}

// parentOf returns the parent of img at its current snapshot, or nil.
func parentOf(img *rbd.Image) (*parentRef, error) {
	pi, err := img.GetParent()
	if errnoOf(err) == syscall.ENOENT {
		return nil, nil
	}
	if err != nil {
		return nil, wrap("parent of "+img.GetName(), err)
	}
	return &parentRef{
		pool: pi.Image.PoolName, namespace: pi.Image.PoolNamespace,
		image: pi.Image.ImageName, imageID: pi.Image.ImageID,
		snap: pi.Snap.SnapName, snapID: pi.Snap.ID,
	}, nil
}

// parentChain returns the parents of img, nearest first.
func (p *Pool) parentChain(img *rbd.Image) ([]parentRef, error) {
	var out []parentRef
	cur, release := img, func() {}
	defer func() { release() }()
	for {
		pr, err := parentOf(cur)
		if err != nil || pr == nil {
			return out, err
		}
		if len(out) == maxChain {
			return nil, fmt.Errorf("%w: clone chain deeper than %d", snapshot.ErrInvalid, maxChain)
		}
		out = append(out, *pr)
		next, releaseNext, err := p.cluster.acquireParent(*pr)
		if err != nil {
			return nil, err
		}
		release()
		cur, release = next, releaseNext
	}
}

// openParent opens a parent read-only at its snapshot, by ids (the
// snapshot may be in the trash namespace, where it has no usable name).
func (c *Cluster) openParent(pr parentRef) (*rbd.Image, error) {
	io, err := c.ioctx(pr.pool, pr.namespace)
	if err != nil {
		return nil, err
	}
	what := pr.pool + "/" + pr.image + "@" + pr.snap
	img, err := rbd.OpenImageByIdReadOnly(io, pr.imageID, rbd.NoSnapshot)
	if err != nil {
		return nil, wrap("open parent "+what, err)
	}
	if err := img.SetSnapByID(pr.snapID); err != nil {
		img.Close()
		return nil, wrap("open parent "+what, err)
	}
	return img, nil
}

// listSnaps returns the user snapshots of img, oldest (lowest id) first.
// rbd_snap_list sizes its buffer in a first call: a snapshot created
// between the two gives ERANGE, and the listing is tried again.
func listSnaps(img *rbd.Image) ([]rbd.SnapInfo, error) {
	for try := 0; ; try++ {
		snaps, err := img.GetSnapshotNames()
		if errnoOf(err) == syscall.ERANGE && try < 5 {
			continue
		}
		if err != nil {
			return nil, err
		}
		slices.SortFunc(snaps, func(a, b rbd.SnapInfo) int {
			return cmpUint(a.Id, b.Id)
		})
		return snaps, nil
	}
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// usedBytes is what `rbd du` reports as used for an image: for each
// snapshot, oldest first, then the head, the objects that exist and
// changed since the one before, not counting the parent's. It leaves img
// at its head.
func usedBytes(img *rbd.Image, snaps []rbd.SnapInfo) (int64, error) {
	defer img.SetSnapByID(noSnap)
	var total int64
	from := ""
	for i := 0; i <= len(snaps); i++ {
		id := noSnap
		if i < len(snaps) {
			id = snaps[i].Id
		}
		if err := img.SetSnapByID(id); err != nil {
			return 0, err
		}
		size, err := img.GetSize()
		if err != nil {
			return 0, err
		}
		err = img.DiffIterate(rbd.DiffIterateConfig{
			SnapName: from, Offset: 0, Length: size,
			IncludeParent: rbd.ExcludeParent, WholeObject: rbd.EnableWholeObject,
			Callback: func(off, length uint64, exists int, _ any) int {
				if exists != 0 {
					total += int64(length)
				}
				return 0
			},
		})
		if err != nil {
			return 0, err
		}
		if i < len(snaps) {
			from = snaps[i].Name
		}
	}
	return total, nil
}

// checkSize refuses sizes snapfs does not make (as the local store).
func checkSize(size int64) error {
	if size <= 0 || size > snapshot.MaxVolumeSize {
		return fmt.Errorf("%w: volume size %d: want 1 byte to %d TiB", snapshot.ErrInvalid, size, snapshot.MaxVolumeSize>>40)
	}
	return nil
}

// roundToSector rounds size up to whole 512-byte sectors, as qemu-img and
// the local store do.
func roundToSector(size int64) int64 { return (size + 511) &^ 511 }

// CreateVolume implements [snapshot.Backend]: an empty image with the
// pool's default features and object size (rbd create).
func (p *Pool) CreateVolume(ctx context.Context, name string, size int64) (snapshot.Volume, error) {
	if err := snapshot.CheckVolumeName(name); err != nil {
		return snapshot.Volume{}, err
	}
	if err := checkSize(size); err != nil {
		return snapshot.Volume{}, err
	}
	release, err := p.lockVolumes(ctx, name)
	if err != nil {
		return snapshot.Volume{}, err
	}
	defer release()
	if err := p.create(name, roundToSector(size)); err != nil {
		return snapshot.Volume{}, err
	}
	return p.Volume(ctx, name)
}

// create creates image name with the pool's defaults.
func (p *Pool) create(name string, size int64) error {
	io, err := p.io()
	if err != nil {
		return err
	}
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	err = rbd.CreateImage(io, name, uint64(size), opts)
	if errnoOf(err) == syscall.EEXIST {
		return fmt.Errorf("%w: volume %q", snapshot.ErrExists, name)
	}
	return wrap("create "+p.spec(name), err)
}

// DeleteVolume implements [snapshot.Backend]: its snapshots (unprotected
// first) and the image. ErrBusy while a clone reads through one of its
// snapshots or another client (a VM) has the image open.
//
// Once checked, the image is renamed out of the pool's namespace first: a
// delete is then done or not done, never a volume with half its snapshots.
// Freeing the space follows; if that fails or the process dies, the next
// Open finishes it (sweep).
func (p *Pool) DeleteVolume(ctx context.Context, name string) error {
	if err := lookupName(name); err != nil {
		return err
	}
	release, err := p.lockVolumes(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	img, err := p.openImage(name, "", false)
	if err != nil {
		return err
	}
	snaps, err := listSnaps(img)
	if err == nil {
		err = p.checkUnused(img, name)
	}
	for _, s := range snaps {
		if err != nil {
			break
		}
		err = p.checkNoClones(img, name, s)
	}
	img.Close()
	if err != nil {
		return err
	}
	io, err := p.io()
	if err != nil {
		return err
	}
	doomed := tempName(deletingPrefix)
	if err := rbd.GetImage(io, name).Rename(doomed); err != nil {
		return wrap("rename "+p.spec(name)+" to "+doomed, err)
	}
	p.destroy(doomed) // what it leaves, the sweep removes
	return nil
}

// destroy removes image name, its snapshots first, and says why it could
// not; an image already gone is no error (a sweep may race with it).
func (p *Pool) destroy(name string) error {
	img, err := p.openImage(name, "", true)
	if errors.Is(err, snapshot.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	snaps, err := listSnaps(img)
	for _, s := range snaps {
		if err != nil {
			break
		}
		err = p.removeSnap(img, name, s.Name)
	}
	img.Close()
	if err != nil {
		return err
	}
	io, err := p.io()
	if err != nil {
		return err
	}
	err = rbd.RemoveImage(io, name)
	switch errnoOf(err) {
	case 0, syscall.ENOENT:
		return nil
	case syscall.ENOTEMPTY:
		return fmt.Errorf("%w: image %s still has snapshots (rbd snap ls --all %s: some may be in the trash, kept for clones)",
			snapshot.ErrBusy, name, p.spec(name))
	case syscall.EBUSY:
		return fmt.Errorf("%w: image %s is open by another client; rbd status %s shows who", snapshot.ErrBusy, name, p.spec(name))
	}
	return wrap("rm "+p.spec(name), err)
}

// foreignWatchers returns the clients other than this one that watch img:
// those that have it open read-write (a VM, rbd-nbd, another snapfs).
func (p *Pool) foreignWatchers(img *rbd.Image) ([]string, error) {
	ws, err := img.ListWatchers()
	if err != nil {
		return nil, wrap("status "+img.GetName(), err)
	}
	var out []string
	self := p.cluster.instanceID()
	for _, w := range ws {
		if w.Id != self {
			out = append(out, fmt.Sprintf("client.%d at %s", w.Id, w.Addr))
		}
	}
	return out, nil
}

// checkUnused returns ErrBusy when another client has the image open.
func (p *Pool) checkUnused(img *rbd.Image, name string) error {
	ws, err := p.foreignWatchers(img)
	if err != nil {
		return err
	}
	if len(ws) > 0 {
		return fmt.Errorf("%w: volume %q is open by %s (a VM?)", snapshot.ErrBusy, name, strings.Join(ws, ", "))
	}
	return nil
}

// sweep removes the images of imports and deletes that died (kill -9, a
// crash): a temp or doomed image that no client watches has no owner left.
// Best effort: an image it cannot check or remove is left for the next
// time. It says whether it left one because a client watched it.
func (p *Pool) sweep() (watched bool) {
	names, err := rbd.GetImageNames(p.ioctx) // from Open or sweepAgain: not closed
	if err != nil {
		return false
	}
	for _, name := range names {
		if !strings.HasPrefix(name, tempPrefix) && !strings.HasPrefix(name, deletingPrefix) {
			continue
		}
		if _, ours := p.importing.Load(name); ours {
			continue
		}
		img, err := p.openImage(name, "", false)
		if err != nil {
			continue
		}
		ws, err := img.ListWatchers()
		img.Close()
		if err == nil && len(ws) == 0 {
			p.destroy(name)
		} else if err == nil {
			watched = true
		}
	}
	return watched
}
