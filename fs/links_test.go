package fs

import (
	"path"
	"testing"

	"snapfs/snapshot"
)

// TestSnapshotLink resolves each link target from where the link lies, as
// the kernel does, and checks that it lands on the snapshot's directory in
// the right tree.
func TestSnapshotLink(t *testing.T) {
	tests := []struct {
		at   string // the link's tree
		link string // the link, below the tree
		up   int
		ref  snapshot.SnapshotRef
		want string // where it resolves, from the mount's root
	}{
		{"", "volumes/kid/parent", 1, snapshot.SnapshotRef{Volume: "base", Snapshot: "s1"}, "volumes/base/snapshots/s1"},
		{"", "volumes/kid/snapshots/k1/parent", 3, snapshot.SnapshotRef{Volume: "base", Snapshot: "s1"}, "volumes/base/snapshots/s1"},
		{"pools/ssd", "volumes/kid/parent", 1, snapshot.SnapshotRef{Volume: "base", Snapshot: "s1"}, "pools/ssd/volumes/base/snapshots/s1"},
		{"", "volumes/kid/parent", 1, snapshot.SnapshotRef{Volume: "ssd/base", Snapshot: "s1"}, "pools/ssd/volumes/base/snapshots/s1"},
		{"pools/ssd", "volumes/kid/parent", 1, snapshot.SnapshotRef{Volume: "rbd/base", Snapshot: "s1"}, "pools/rbd/volumes/base/snapshots/s1"},
		{"pools/ssd", "volumes/kid/snapshots/k1/parent", 3, snapshot.SnapshotRef{Volume: "rbd/base", Snapshot: "s1"}, "pools/rbd/volumes/base/snapshots/s1"},
	}
	for _, tt := range tests {
		f := &filesystem{at: tt.at}
		target := f.snapshotLink(tt.up, tt.ref)
		if path.IsAbs(target) {
			t.Errorf("%s/%s -> %s: not relative", tt.at, tt.link, target)
		}
		if got := path.Join(tt.at, path.Dir(tt.link), target); got != tt.want {
			t.Errorf("%s/%s -> %s resolves to %s, want %s", tt.at, tt.link, target, got, tt.want)
		}
	}
}
