package fs

import (
	"context"
	"strings"

	"snapfs/snapshot"
)

// sinceContents is volumes/VOL/snapshots/S/since/: FROM.qcow2 for every
// snapshot FROM older than S in the volume's chain, the incremental export
// of S since FROM (snapshot.IncrementalExport): a qcow2 overlay holding
// only what changed, whose backing file is ../../FROM/disk.qcow2, so that a
// copy of the snapshots folder (cp -r, rsync -a) is a chain qemu opens.
// Older snapshots can be deleted, so the listing is asked for each time.
type sinceContents struct {
	fsys *filesystem
	id   identity
	snap snapshot.Snapshot
}

// sinceSuffix ends the name of every file in since/.
const sinceSuffix = ".qcow2"

// older returns the snapshots of the volume taken before c.snap, oldest
// first.
func (c sinceContents) older(ctx context.Context) ([]snapshot.Snapshot, error) {
	snaps, err := c.fsys.backend.ListSnapshots(ctx, c.snap.Volume)
	if err != nil {
		return nil, err
	}
	for i, s := range snaps {
		if s.Name == c.snap.Name {
			return snaps[:i], nil
		}
	}
	return nil, notFound(c.snap.Name)
}

func (c sinceContents) file(from snapshot.Snapshot) treeNode {
	name := from.Name + sinceSuffix
	ref := snapshot.SnapshotRef{Volume: c.snap.Volume, Snapshot: c.snap.Name}
	e := c.fsys.newExportFile(name, c.id.versioned(name, from.Created), ref, c.snap.Created, exportSince)
	e.since = from.Name
	return e
}

func (c sinceContents) list(ctx context.Context) ([]treeNode, error) {
	older, err := c.older(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(older))
	for _, s := range older {
		out = append(out, c.file(s))
	}
	return out, nil
}

func (c sinceContents) find(ctx context.Context, name string) (treeNode, error) {
	from, ok := strings.CutSuffix(name, sinceSuffix)
	if !ok {
		return nil, notFound(name)
	}
	older, err := c.older(ctx)
	if err != nil {
		return nil, err
	}
	for _, s := range older {
		if s.Name == from {
			return c.file(s), nil
		}
	}
	return nil, notFound(name)
}
