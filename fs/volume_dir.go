package fs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"syscall"
	"time"

	"snapfs/snapshot"
)

// volumesContents is volumes/: one directory per volume of the backend.
type volumesContents struct {
	fsys *filesystem
	id   identity
	// dir is the directory itself: from its inode, the clone gesture
	// finds the mount's root and the other trees (cloneTree).
	dir *dir
}

func (c *volumesContents) list(ctx context.Context) ([]treeNode, error) {
	vols, err := c.fsys.backend.ListVolumes(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(vols))
	for _, v := range vols {
		out = append(out, c.volumeDir(v))
	}
	return out, nil
}

func (c *volumesContents) find(ctx context.Context, name string) (treeNode, error) {
	v, err := c.fsys.backend.Volume(ctx, name)
	if err != nil {
		return nil, err
	}
	return c.volumeDir(v), nil
}

// symlink is the clone gesture: `ln -s ../V/snapshots/S volumes/NEW` (or
// V/snapshots/S) makes NEW a copy-on-write clone of snapshot S of V. The
// snapshot may be in another tree of the mount (cloneSource): `ln -s
// ../../../pools/B/volumes/V/snapshots/S pools/A/volumes/NEW` clones into
// pool A, if A's backend clones from B's (crossCloner: two pools of one
// cluster); EXDEV otherwise, with a log line. The kernel wants a symlink
// back, so the reply is a link to S that is never cached (entry timeout
// 0): the next lookup of NEW finds the clone's directory.
func (c *volumesContents) symlink(ctx context.Context, target, name string) (treeNode, error) {
	tree, ref, ok := cloneSource(c.fsys.at, name, target)
	if !ok {
		return nil, fmt.Errorf("%w: %s: a clone links to a snapshot in this mount by a relative path, ../VOL/snapshots/SNAP or, to another pool, as the clone's parent link will show it",
			snapshot.ErrInvalid, target)
	}
	mctx, cancel := c.fsys.steadyContext(ctx)
	defer cancel()
	var v snapshot.Volume
	var err error
	if tree == c.fsys.at {
		v, err = c.fsys.manager.Clone(mctx, ref.Volume, ref.Snapshot, name)
	} else {
		v, err = c.cloneFrom(mctx, tree, ref, name)
	}
	if err != nil {
		return nil, err
	}
	link := c.fsys.newSymlink(name, c.id.child(name).child("clone-link"), v.Created, func(context.Context) (string, error) {
		return target, nil
	})
	link.entryTimeout = 0
	return link, nil
}

// cloneFrom makes volume name of this tree a clone of snapshot ref of the
// tree that shows at tree, another tree of the mount.
func (c *volumesContents) cloneFrom(ctx context.Context, tree string, ref snapshot.SnapshotRef, name string) (snapshot.Volume, error) {
	f := c.fsys
	src, err := c.cloneTree(ctx, tree)
	if err == nil {
		_, err = src.backend.Snapshot(ctx, ref.Volume, ref.Snapshot)
	}
	if err != nil {
		return snapshot.Volume{}, fmt.Errorf("%s: %w", path.Join(tree, "volumes", ref.Volume, "snapshots", ref.Snapshot), err)
	}
	if src.backend == f.backend {
		// The root's pool, shown again under pools/: the same backend.
		return f.manager.Clone(ctx, ref.Volume, ref.Snapshot, name)
	}
	var v snapshot.Volume
	err = fmt.Errorf("%w: %s makes no clones of another backend's snapshots", snapshot.ErrUnsupported, f.backend.Name())
	if cc, ok := f.backend.(crossCloner); ok {
		v, err = cc.CloneFrom(ctx, src.backend, ref.Volume, ref.Snapshot, name)
	}
	if errors.Is(err, snapshot.ErrUnsupported) {
		// A link across devices: ln -s can only say EXDEV, the log
		// says why and what to do.
		snap := path.Join(tree, "volumes", ref.Volume, "snapshots", ref.Snapshot)
		f.log.Printf("snapfs: clone %s as %s: %v; copy it instead: cp %s/disk.raw %s (in the mount)",
			snap, path.Join(f.at, "volumes", name), err, snap, path.Join(f.at, "import", name))
		return snapshot.Volume{}, syscall.EXDEV
	}
	return v, err
}

// cloneTree returns the filesystem of the tree of the mount that shows at
// tree ("" or "pools/NAME"), found as a lookup would find it: from the
// mount's root, down to the tree's volumes/. ErrNotFound for a pool that
// is not mounted.
func (c *volumesContents) cloneTree(ctx context.Context, tree string) (*filesystem, error) {
	d, ok := c.dir.Root().Operations().(*dir)
	if !ok {
		return nil, fmt.Errorf("the root of the mount is a %T, not a directory", c.dir.Root().Operations())
	}
	names := []string{"volumes"}
	if tree != "" {
		names = append(strings.Split(tree, "/"), names...)
	}
	for _, name := range names {
		n, err := d.contents.find(ctx, name)
		if err != nil {
			return nil, err
		}
		if d, ok = n.(*dir); !ok {
			return nil, notFound(tree)
		}
	}
	vols, ok := d.contents.(*volumesContents)
	if !ok {
		return nil, notFound(tree)
	}
	return vols.fsys, nil
}

// cloneSource resolves the target of a clone gesture, `ln -s target
// volumes/NEW` in the tree that shows at at ("" or "pools/NAME"), to a
// snapshot of a tree of the mount: tree is where that tree shows, ref
// names the snapshot as tree's backend does. The target is read either as
// ln -s means it, from volumes/ (V/snapshots/S, or
// ../../../pools/P/volumes/V/snapshots/S from a pool), or as the clone's
// parent link will show it (links.go), from volumes/NEW/ (../V/snapshots/S,
// or ../../../P/volumes/V/snapshots/S from a pool). The two readings
// never both land on a snapshot: a snapshot's directory is 4 or 6 levels
// below the root, and the readings differ by one. A target that leaves the
// mount, or is absolute, lands nowhere; so does snapshots/latest, a link
// and never a snapshot (the name is reserved): links are not followed, and
// ENOENT would deny a path that ls shows.
func cloneSource(at, name, target string) (tree string, ref snapshot.SnapshotRef, ok bool) {
	if path.IsAbs(target) {
		return "", snapshot.SnapshotRef{}, false
	}
	volumes := path.Join(at, "volumes")
	for _, from := range []string{volumes, path.Join(volumes, name)} {
		elems, inside := resolve(from, target)
		if !inside {
			continue
		}
		if len(elems) == 6 && elems[0] == poolsDir {
			tree, elems = elems[0]+"/"+elems[1], elems[2:]
		}
		if len(elems) == 4 && elems[0] == "volumes" && elems[2] == "snapshots" && elems[3] != snapshot.LatestName {
			return tree, snapshot.SnapshotRef{Volume: elems[1], Snapshot: elems[3]}, true
		}
		tree = ""
	}
	return "", snapshot.SnapshotRef{}, false
}

// resolve returns the names on the way from the mount's root to target,
// read from directory dir (a path from the root), as the kernel walks a
// link without following links; inside is false if the walk leaves the
// mount.
func resolve(dir, target string) (elems []string, inside bool) {
	p := path.Join(dir, target)
	switch {
	case p == ".." || strings.HasPrefix(p, "../"):
		return nil, false
	case p == ".":
		return nil, true
	}
	return strings.Split(p, "/"), true
}

// volumeDir returns the directory of volume v.
func (c *volumesContents) volumeDir(v snapshot.Volume) *dir {
	id := c.id.versioned(v.Name, v.Created)
	contents := volumeContents{fsys: c.fsys, id: id, volume: v.Name, created: v.Created}
	return c.fsys.newDir(v.Name, id, contents, false, v.Created, shortTimeout)
}

// volumeContents is volumes/VOL/.
type volumeContents struct {
	fsys    *filesystem
	id      identity
	volume  string
	created time.Time
}

// entries are info.json, head.raw, snapshots/, the revert control file and,
// for a clone, the parent link.
func (c volumeContents) entries(ctx context.Context) ([]treeNode, error) {
	f := c.fsys
	info := f.newJSONFile("info.json", c.id.child("info.json"), func(ctx context.Context) (any, time.Time, error) {
		return c.info(ctx)
	})
	head := f.newHeadFile(c.id.child("head.raw"), c.volume)
	snapsID := c.id.child("snapshots")
	snaps := f.newDir("snapshots", snapsID, snapshotsContents{fsys: f, id: snapsID, volume: c.volume}, true, c.created, immutableTimeout)
	// revert: `echo S > volumes/V/revert` makes the head equal to
	// snapshot S again; S and every other snapshot stay.
	revert := f.newControlFile("revert", c.id.child("revert"), c.created, func(ctx context.Context, name string) error {
		return f.manager.Revert(ctx, c.volume, name)
	})
	out := []treeNode{info, head, snaps, revert}
	v, err := f.backend.Volume(ctx, c.volume)
	if err != nil {
		return nil, err
	}
	if v.Parent != nil {
		out = append(out, c.parentLink())
	}
	return out, nil
}

// parentLink is volumes/VOL/parent for a clone: a relative link to the
// snapshot it was cloned from, in whichever tree of the mount that is
// (links.go). Removing it flattens the clone.
func (c volumeContents) parentLink() treeNode {
	return c.fsys.newSymlink(parentLinkName, c.id.child(parentLinkName), c.created, func(ctx context.Context) (string, error) {
		v, err := c.fsys.backend.Volume(ctx, c.volume)
		if err == nil && v.Parent == nil {
			err = notFound(parentLinkName)
		}
		if err != nil {
			return "", err
		}
		return c.fsys.snapshotLink(1, *v.Parent), nil
	})
}

// parentLinkName is the name of a clone's link to its parent snapshot.
const parentLinkName = "parent"

func (c volumeContents) list(ctx context.Context) ([]treeNode, error) { return c.entries(ctx) }

func (c volumeContents) find(ctx context.Context, name string) (treeNode, error) {
	entries, err := c.entries(ctx)
	if err != nil {
		return nil, err
	}
	return staticContents(entries).find(ctx, name)
}

// unlink of parent flattens the clone (`rm volumes/NEW/parent`): it copies
// in what the clone still reads from its parent, then cuts the link, and
// returns when that is done. Nothing else in a volume directory can be
// removed.
func (c volumeContents) unlink(ctx context.Context, name string) error {
	if name != parentLinkName {
		return syscall.EPERM
	}
	v, err := c.fsys.backend.Volume(ctx, c.volume)
	if err != nil {
		return err
	}
	if v.Parent == nil {
		return notFound(name)
	}
	// The flatten outlives an interrupted rm (it is safe to interrupt,
	// but a finished one is worth more): it ends with the mount.
	return c.fsys.manager.Flatten(c.fsys.ctx, c.volume)
}

// info is volumes/VOL/info.json: the volume as the model describes it
// (size, head_path, chain, parent, bytes_used...) and its snapshots, as
// snapfs volume list --json shows it (snapshot.VolumeInfo).
func (c volumeContents) info(ctx context.Context) (any, time.Time, error) {
	v, err := c.fsys.backend.Volume(ctx, c.volume)
	if err != nil {
		return nil, time.Time{}, err
	}
	info, err := snapshot.VolumeInfoFor(ctx, c.fsys.backend, v)
	if err != nil {
		return nil, time.Time{}, err
	}
	return info, headMtime(v), nil
}

// headMtime is when the head of v last changed, as far as we can tell: the
// mtime of its head file if it has one, else now.
func headMtime(v snapshot.Volume) time.Time {
	if v.HeadPath != "" {
		if st, err := os.Stat(v.HeadPath); err == nil {
			return st.ModTime()
		}
	}
	return time.Now()
}
