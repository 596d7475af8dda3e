package fs

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"snapfs/snapshot"
)

// volumesContents is volumes/: one directory per volume of the backend.
type volumesContents struct {
	fsys *filesystem
	id   identity
}

func (c volumesContents) list(ctx context.Context) ([]treeNode, error) {
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

func (c volumesContents) find(ctx context.Context, name string) (treeNode, error) {
	v, err := c.fsys.backend.Volume(ctx, name)
	if err != nil {
		return nil, err
	}
	return c.volumeDir(v), nil
}

// symlink is the clone gesture: `ln -s ../V/snapshots/S volumes/NEW` (or
// V/snapshots/S) makes NEW a copy-on-write clone of snapshot S of V. The
// kernel wants a symlink back, so the reply is a link to S that is never
// cached (entry timeout 0): the next lookup of NEW finds the clone's
// directory.
func (c volumesContents) symlink(ctx context.Context, target, name string) (treeNode, error) {
	ref, ok := cloneSource(target)
	if !ok {
		return nil, fmt.Errorf("%w: %s: a clone links to a snapshot of a volume of this tree, ../VOL/snapshots/SNAP", snapshot.ErrInvalid, target)
	}
	mctx, cancel := c.fsys.mutationContext(ctx)
	defer cancel()
	v, err := c.fsys.manager.Clone(mctx, ref.Volume, ref.Snapshot, name)
	if err != nil {
		return nil, err
	}
	link := c.fsys.newSymlink(name, c.id.child(name).child("clone-link"), v.Created, func(context.Context) (string, error) {
		return target, nil
	})
	link.entryTimeout = 0
	return link, nil
}

// cloneSource parses the target of a clone gesture: ../VOL/snapshots/SNAP
// or VOL/snapshots/SNAP.
func cloneSource(target string) (snapshot.SnapshotRef, bool) {
	rest := strings.TrimPrefix(strings.TrimPrefix(target, "./"), "../")
	parts := strings.Split(strings.TrimSuffix(rest, "/"), "/")
	if len(parts) != 3 || parts[1] != "snapshots" || parts[0] == "" || parts[2] == "" ||
		parts[0] == ".." || parts[2] == ".." || parts[0] == "." || parts[2] == "." {
		return snapshot.SnapshotRef{}, false
	}
	return snapshot.SnapshotRef{Volume: parts[0], Snapshot: parts[2]}, true
}

// volumeDir returns the directory of volume v.
func (c volumesContents) volumeDir(v snapshot.Volume) *dir {
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

// volumeInfo is volumes/VOL/info.json: the volume as the model describes it
// (size, head_path, chain, parent, bytes_used...) and its snapshots.
type volumeInfo struct {
	snapshot.Volume
	Snapshots []string `json:"snapshots"`
	Latest    string   `json:"latest,omitempty"`
}

func (c volumeContents) info(ctx context.Context) (any, time.Time, error) {
	v, err := c.fsys.backend.Volume(ctx, c.volume)
	if err != nil {
		return nil, time.Time{}, err
	}
	snaps, err := c.fsys.backend.ListSnapshots(ctx, c.volume)
	if err != nil {
		return nil, time.Time{}, err
	}
	info := volumeInfo{Volume: v, Snapshots: []string{}}
	for _, s := range snaps {
		info.Snapshots = append(info.Snapshots, s.Name)
		info.Latest = s.Name
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
