package fs

import (
	"path"
	"strings"

	"snapfs/snapshot"
)

// Links to snapshots (a clone's volumes/NEW/parent, and any other link that
// names a snapshot) are relative, so that they resolve inside the mount
// wherever it is mounted and in a copy of the tree made with cp -r.
//
// A mount shows one backend at its root and each pool again under
// pools/POOL/ (see pools.go). A backend names a parent snapshot
// (snapshot.Volume.Parent) by its volume alone when it is in the same
// backend, and as "POOL/VOLUME" when it is in another pool of the same
// cluster (rbdio). A link to a snapshot of the same backend stays in the
// link's own tree; one to another pool goes through pools/POOL/, which
// every mounted pool has. A parent in a pool that is not mounted gets a
// link to where it would show: it dangles, and info.json still names it.
// The clone gesture takes a parent link's target back as the snapshot to
// clone (cloneSource, in volume_dir.go).

// snapshotLink returns the target of a symlink to snapshot ref, for a link
// that lies up directories below the volumes/ directory of f's tree: 1 for
// volumes/NEW/parent, 3 for volumes/NEW/snapshots/S/parent. ref.Volume is
// as the backend names it: "VOL", or "POOL/VOL" for another pool.
func (f *filesystem) snapshotLink(up int, ref snapshot.SnapshotRef) string {
	pool, vol, other := strings.Cut(ref.Volume, "/")
	if !other {
		return strings.Repeat("../", up) + path.Join(ref.Volume, "snapshots", ref.Snapshot)
	}
	// Up to volumes/ of the tree, then out of it: to pools/ when the
	// tree is a pool (it is pools/NAME), else to the root and into pools/.
	rel := strings.Repeat("../", up+1)
	if f.at != "" {
		rel += "../"
	} else {
		rel += poolsDir + "/"
	}
	return rel + path.Join(pool, "volumes", vol, "snapshots", ref.Snapshot)
}
