package fs

import (
	"context"
	"time"

	"snapfs/snapshot"
)

// instancesContents is instances/: a directory per instance of the
// instance provider (none without one).
type instancesContents struct {
	fsys *filesystem
	id   identity
}

func (c instancesContents) list(ctx context.Context) ([]treeNode, error) {
	if c.fsys.instances == nil {
		return nil, nil
	}
	all, err := c.fsys.instances.ListInstances(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(all))
	for _, in := range all {
		out = append(out, c.instanceDir(in))
	}
	return out, nil
}

func (c instancesContents) find(ctx context.Context, name string) (treeNode, error) {
	if c.fsys.instances == nil {
		return nil, notFound(name)
	}
	in, err := c.fsys.instances.Instance(ctx, name)
	if err != nil {
		return nil, err
	}
	return c.instanceDir(in), nil
}

func (c instancesContents) instanceDir(in snapshot.Instance) *dir {
	id := c.id.versioned(in.Name, in.Created)
	mtime := in.Created
	if mtime.IsZero() {
		mtime = c.fsys.mounted
	}
	contents := instanceContents{fsys: c.fsys, id: id, instance: in.Name, created: mtime}
	return c.fsys.newDir(in.Name, id, contents, false, mtime, shortTimeout)
}

// instanceContents is instances/INST/.
type instanceContents struct {
	fsys     *filesystem
	id       identity
	instance string
	created  time.Time
}

func (c instanceContents) entries() []treeNode {
	f := c.fsys
	info := f.newJSONFile("info.json", c.id.child("info.json"), func(ctx context.Context) (any, time.Time, error) {
		in, err := f.instances.Instance(ctx, c.instance)
		return in, c.created, err
	})
	disksID := c.id.child("disks")
	disks := f.newDir("disks", disksID, disksContents{fsys: f, id: disksID, instance: c.instance, created: c.created}, false, c.created, immutableTimeout)
	snapsID := c.id.child("snapshots")
	snaps := f.newDir("snapshots", snapsID, instanceSnapshotsContents{fsys: f, id: snapsID, instance: c.instance}, true, c.created, immutableTimeout)
	// revert: `echo S > instances/I/revert` reverts the instance to
	// snapshot S (the provider's InstanceReverter; ENOTSUP without one).
	revert := f.newControlFile("revert", c.id.child("revert"), c.created, func(ctx context.Context, name string) error {
		return f.manager.RevertInstance(ctx, c.instance, name)
	})
	return []treeNode{info, disks, snaps, revert}
}

func (c instanceContents) list(context.Context) ([]treeNode, error) { return c.entries(), nil }

func (c instanceContents) find(ctx context.Context, name string) (treeNode, error) {
	return staticContents(c.entries()).find(ctx, name)
}

// disksContents is instances/INST/disks/: a link per device to its volume.
type disksContents struct {
	fsys     *filesystem
	id       identity
	instance string
	created  time.Time
}

func (c disksContents) link(device string) *symlink {
	return c.fsys.newSymlink(device, c.id.child(device), c.created, func(ctx context.Context) (string, error) {
		in, err := c.fsys.instances.Instance(ctx, c.instance)
		if err != nil {
			return "", err
		}
		for _, d := range in.Disks {
			if d.Device == device {
				return diskLink(d.Volume), nil
			}
		}
		return "", notFound(device)
	})
}

func (c disksContents) list(ctx context.Context) ([]treeNode, error) {
	in, err := c.fsys.instances.Instance(ctx, c.instance)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(in.Disks))
	for _, d := range in.Disks {
		out = append(out, c.link(d.Device))
	}
	return out, nil
}

func (c disksContents) find(ctx context.Context, name string) (treeNode, error) {
	nodes, err := c.list(ctx)
	if err != nil {
		return nil, err
	}
	return staticContents(nodes).find(ctx, name)
}

// instanceSnapshotsContents is instances/INST/snapshots/. mkdir snapshots
// every disk at one point; rmdir deletes the instance snapshot and its
// disk snapshots.
type instanceSnapshotsContents struct {
	fsys     *filesystem
	id       identity
	instance string
}

func (c instanceSnapshotsContents) list(ctx context.Context) ([]treeNode, error) {
	snaps, err := c.fsys.instances.ListInstanceSnapshots(ctx, c.instance)
	if err != nil {
		return nil, err
	}
	out := make([]treeNode, 0, len(snaps))
	for _, s := range snaps {
		out = append(out, c.snapshotDir(s))
	}
	return out, nil
}

func (c instanceSnapshotsContents) find(ctx context.Context, name string) (treeNode, error) {
	s, err := c.fsys.instances.InstanceSnapshot(ctx, c.instance, name)
	if err != nil {
		return nil, err
	}
	return c.snapshotDir(s), nil
}

func (c instanceSnapshotsContents) mkdir(ctx context.Context, name string) (treeNode, error) {
	if err := snapshot.CheckNewSnapshotName(name); err != nil {
		return nil, err
	}
	mctx, cancel := c.fsys.steadyContext(ctx)
	defer cancel()
	s, err := c.fsys.manager.SnapshotInstance(mctx, c.instance, name, nil)
	if err != nil {
		return nil, err
	}
	return c.snapshotDir(s), nil
}

// rmdir deletes the instance snapshot and its disk snapshots: EBUSY while
// a file of one of them is open, or while a disk snapshot has clones.
func (c instanceSnapshotsContents) rmdir(ctx context.Context, name string) error {
	mctx, cancel := c.fsys.steadyContext(ctx)
	defer cancel()
	refs := func() []snapshot.SnapshotRef {
		s, err := c.fsys.instances.InstanceSnapshot(mctx, c.instance, name)
		if err != nil {
			return nil
		}
		var out []snapshot.SnapshotRef
		for _, d := range s.Disks {
			out = append(out, snapshot.SnapshotRef{Volume: d.Volume, Snapshot: d.Snapshot})
		}
		return out
	}
	return c.fsys.deleteWaiting(mctx, c.instance+"/snapshots/"+name, refs, func() error {
		return c.fsys.manager.DeleteInstanceSnapshot(mctx, c.instance, name)
	})
}

func (c instanceSnapshotsContents) snapshotDir(s snapshot.InstanceSnapshot) *dir {
	id := c.id.versioned(s.Name, s.Created)
	return c.fsys.newDir(s.Name, id, instanceSnapshotContents{fsys: c.fsys, id: id, snap: s}, false, s.Created, shortTimeout)
}

// instanceSnapshotContents is instances/INST/snapshots/SNAP/: meta.json and
// each disk's exports, named after its device.
type instanceSnapshotContents struct {
	fsys *filesystem
	id   identity
	snap snapshot.InstanceSnapshot
}

func (c instanceSnapshotContents) entries() []treeNode {
	f, s := c.fsys, c.snap
	out := []treeNode{f.newJSONFile("meta.json", c.id.child("meta.json"), func(ctx context.Context) (any, time.Time, error) {
		// The exchange format (a restore reads it), and what the provider
		// keeps besides (libvirt: the domain XML, the frozen window).
		m, err := f.manager.InstanceSnapshotInfo(ctx, s.Instance, s.Name)
		return m, m.Created, err
	})}
	for _, d := range s.Disks {
		ref := snapshot.SnapshotRef{Volume: d.Volume, Snapshot: d.Snapshot}
		disk := &instanceDisk{instance: s.Instance, snapshot: s.Name, device: d.Device}
		raw := f.newExportFile(d.Device+".raw", c.id.child(d.Device+".raw"), ref, s.Created, exportRaw)
		qcow2 := f.newExportFile(d.Device+".qcow2", c.id.child(d.Device+".qcow2"), ref, s.Created, exportQcow2)
		raw.disk, qcow2.disk = disk, disk
		out = append(out, raw, qcow2)
	}
	return out
}

func (c instanceSnapshotContents) list(context.Context) ([]treeNode, error) {
	return c.entries(), nil
}

func (c instanceSnapshotContents) find(ctx context.Context, name string) (treeNode, error) {
	return staticContents(c.entries()).find(ctx, name)
}
