package fs

import (
	"context"
	"os"
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

func (c volumeContents) entries() []treeNode {
	f := c.fsys
	info := f.newJSONFile("info.json", c.id.child("info.json"), func(ctx context.Context) (any, time.Time, error) {
		return c.info(ctx)
	})
	head := f.newHeadFile(c.id.child("head.raw"), c.volume)
	snapsID := c.id.child("snapshots")
	snaps := f.newDir("snapshots", snapsID, snapshotsContents{fsys: f, id: snapsID, volume: c.volume}, true, c.created, immutableTimeout)
	return []treeNode{info, head, snaps}
}

func (c volumeContents) list(context.Context) ([]treeNode, error) { return c.entries(), nil }

func (c volumeContents) find(ctx context.Context, name string) (treeNode, error) {
	return staticContents(c.entries()).find(ctx, name)
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
