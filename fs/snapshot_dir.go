package fs

import (
	"context"
	"fmt"
	"time"

	"snapfs/snapshot"
)

// snapshotsContents is volumes/VOL/snapshots/: a directory per snapshot,
// oldest first, and the link "latest". mkdir takes a snapshot; rmdir
// deletes one.
type snapshotsContents struct {
	fsys   *filesystem
	id     identity
	volume string
}

func (c snapshotsContents) list(ctx context.Context) ([]treeNode, error) {
	snaps, err := c.fsys.backend.ListSnapshots(ctx, c.volume)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(snaps)+1)
	for _, s := range snaps {
		out = append(out, c.snapshotDir(s))
	}
	if len(snaps) > 0 {
		out = append(out, c.latest(snaps[len(snaps)-1]))
	}
	return out, nil
}

func (c snapshotsContents) find(ctx context.Context, name string) (treeNode, error) {
	if name == snapshot.LatestName {
		snaps, err := c.fsys.backend.ListSnapshots(ctx, c.volume)
		if err != nil {
			return nil, err
		}
		if len(snaps) == 0 {
			return nil, notFound(name)
		}
		return c.latest(snaps[len(snaps)-1]), nil
	}
	s, err := c.fsys.backend.Snapshot(ctx, c.volume, name)
	if err != nil {
		return nil, err
	}
	return c.snapshotDir(s), nil
}

// latest returns the link to the newest snapshot, newest. Its target is
// read again at each readlink: it moves with every mkdir and rmdir.
func (c snapshotsContents) latest(newest snapshot.Snapshot) *symlink {
	return c.fsys.newSymlink(snapshot.LatestName, c.id.child(snapshot.LatestName), newest.Created, func(ctx context.Context) (string, error) {
		snaps, err := c.fsys.backend.ListSnapshots(ctx, c.volume)
		if err != nil {
			return "", err
		}
		if len(snaps) == 0 {
			return "", notFound(snapshot.LatestName)
		}
		return snaps[len(snaps)-1].Name, nil
	})
}

// mkdir takes a snapshot of the volume. The directory appears once the
// snapshot exists: there is no empty snapshot directory to see meanwhile.
func (c snapshotsContents) mkdir(ctx context.Context, name string) (treeNode, error) {
	// The backend checks names too; "latest" is the tree's, so the tree
	// makes sure.
	if err := snapshot.CheckNewSnapshotName(name); err != nil {
		return nil, err
	}
	mctx, cancel := c.fsys.steadyContext(ctx)
	defer cancel()
	snaps, err := c.fsys.backend.CreateSnapshots(mctx, []string{c.volume}, name, snapshot.SnapshotOptions{})
	if err != nil {
		return nil, err
	}
	if len(snaps) != 1 {
		return nil, fmt.Errorf("backend %s made %d snapshots of one volume", c.fsys.backend.Name(), len(snaps))
	}
	return c.snapshotDir(snaps[0]), nil
}

// rmdir deletes a snapshot, unless a file of it is open here (EBUSY, from
// the manager's holds); the backend refuses too while something depends on
// it (clones, an instance snapshot).
func (c snapshotsContents) rmdir(ctx context.Context, name string) error {
	mctx, cancel := c.fsys.steadyContext(ctx)
	defer cancel()
	ref := []snapshot.SnapshotRef{{Volume: c.volume, Snapshot: name}}
	return c.fsys.deleteWaiting(mctx, name, func() []snapshot.SnapshotRef { return ref }, func() error {
		return c.fsys.manager.DeleteSnapshot(mctx, c.volume, name)
	})
}

// snapshotDir returns the directory of snapshot s. Its entry is cached
// briefly (the snapshot may be deleted outside the mount), its attributes
// for long (they never change).
func (c snapshotsContents) snapshotDir(s snapshot.Snapshot) *dir {
	id := c.id.versioned(s.Name, s.Created)
	contents := snapshotContents{fsys: c.fsys, id: id, snap: s}
	return c.fsys.newDir(s.Name, id, contents, false, s.Created, shortTimeout)
}

// snapshotContents is volumes/VOL/snapshots/SNAP/.
type snapshotContents struct {
	fsys *filesystem
	id   identity
	// snap is the snapshot as it was looked up. Only its immutable
	// fields are used (name, size, creation time); its parent can change
	// when the snapshot before it is deleted, so it is read again.
	snap snapshot.Snapshot
}

// files returns the entries that every snapshot has.
func (c snapshotContents) files() []treeNode {
	f, s := c.fsys, c.snap
	ref := snapshot.SnapshotRef{Volume: s.Volume, Snapshot: s.Name}
	meta := f.newJSONFile("meta.json", c.id.child("meta.json"), func(ctx context.Context) (any, time.Time, error) {
		m, err := snapshot.VolumeSnapshotMetaFor(ctx, f.backend, s.Volume, s.Name)
		return m, m.Created, err
	})
	return []treeNode{
		f.newExportFile("disk.raw", c.id.child("disk.raw"), ref, s.Created, exportRaw),
		f.newExportFile("disk.qcow2", c.id.child("disk.qcow2"), ref, s.Created, exportQcow2),
		meta,
		f.newDir("since", c.id.child("since"), sinceContents{fsys: f, id: c.id.child("since"), snap: s}, false, s.Created, shortTimeout),
	}
}

// parent returns the link to the previous snapshot, or nil for the first.
func (c snapshotContents) parent(ctx context.Context) (treeNode, error) {
	s, err := c.fsys.backend.Snapshot(ctx, c.snap.Volume, c.snap.Name)
	if err != nil || s.Parent == "" {
		return nil, err
	}
	return c.fsys.newSymlink("parent", c.id.child("parent"), s.Created, func(ctx context.Context) (string, error) {
		s, err := c.fsys.backend.Snapshot(ctx, c.snap.Volume, c.snap.Name)
		if err == nil && s.Parent == "" {
			err = notFound("parent")
		}
		return "../" + s.Parent, err
	}), nil
}

func (c snapshotContents) list(ctx context.Context) ([]treeNode, error) {
	out := c.files()
	p, err := c.parent(ctx)
	if err != nil {
		return nil, err
	}
	if p != nil {
		out = append(out, p)
	}
	return out, nil
}

func (c snapshotContents) find(ctx context.Context, name string) (treeNode, error) {
	if name == "parent" {
		p, err := c.parent(ctx)
		if err == nil && p == nil {
			err = notFound(name)
		}
		return p, err
	}
	return staticContents(c.files()).find(ctx, name)
}
