package fs

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"snapfs/snapshot"
)

// TestCloneSource: the clone gesture reads its target as ln -s means it
// (from volumes/) or as the clone's parent link will show it (from
// volumes/NEW/), in the tree where it is made; every parent link that
// snapshotLink makes is taken back as the snapshot it names.
func TestCloneSource(t *testing.T) {
	tests := []struct {
		at, target string
		tree       string // "-": refused
		ref        snapshot.SnapshotRef
	}{
		{"", "../v/snapshots/s", "", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"", "v/snapshots/s", "", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"", "./v/snapshots/s/", "", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"", "../pools/b/volumes/v/snapshots/s", "pools/b", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"", "../../pools/b/volumes/v/snapshots/s", "pools/b", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../v/snapshots/s", "pools/a", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../../../pools/b/volumes/v/snapshots/s", "pools/b", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../../../b/volumes/v/snapshots/s", "pools/b", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../../b/volumes/v/snapshots/s", "pools/b", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../../../volumes/v/snapshots/s", "", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"pools/a", "../../../../volumes/v/snapshots/s", "", snapshot.SnapshotRef{Volume: "v", Snapshot: "s"}},
		{"", "/mnt/volumes/v/snapshots/s", "-", snapshot.SnapshotRef{}},
		{"", "../../../volumes/v/snapshots/s", "-", snapshot.SnapshotRef{}}, // out of the mount
		{"", "../../x/snapshots/s", "-", snapshot.SnapshotRef{}},
		{"", "../v", "-", snapshot.SnapshotRef{}},
		{"", "../v/snapshots", "-", snapshot.SnapshotRef{}},
		{"", "../v/heads/s", "-", snapshot.SnapshotRef{}},
		{"", "../v/snapshots/latest", "-", snapshot.SnapshotRef{}},
		{"", "v/snapshots/latest", "-", snapshot.SnapshotRef{}},
		{"pools/a", "../../../pools/b/volumes/v/snapshots/latest", "-", snapshot.SnapshotRef{}},
		{"", "../../pools/b/volumes/v", "-", snapshot.SnapshotRef{}},
		{"", "../../pools/b/import/v/snapshots/s", "-", snapshot.SnapshotRef{}},
		{"pools/a", "../../../../../pools/b/volumes/v/snapshots/s", "-", snapshot.SnapshotRef{}},
	}
	for _, tt := range tests {
		tree, ref, ok := cloneSource(tt.at, "new", tt.target)
		if tt.tree == "-" {
			if ok {
				t.Errorf("%s: ln -s %s accepted, as %s %+v", tt.at, tt.target, tree, ref)
			}
			continue
		}
		if !ok || tree != tt.tree || ref != tt.ref {
			t.Errorf("%s: ln -s %s: %q %+v %v, want %q %+v", tt.at, tt.target, tree, ref, ok, tt.tree, tt.ref)
		}
	}

	// A parent link, written back as a clone's target, names its parent.
	for _, at := range []string{"", "pools/a", "pools/b"} {
		f := &filesystem{at: at}
		for _, parent := range []string{"v", "a/v", "b/v"} {
			want, vol, other := strings.Cut(parent, "/")
			if other {
				want = poolsDir + "/" + want
			} else {
				want, vol = at, parent
			}
			link := f.snapshotLink(1, snapshot.SnapshotRef{Volume: parent, Snapshot: "s"})
			tree, ref, ok := cloneSource(at, "new", link)
			if !ok || tree != want || ref != (snapshot.SnapshotRef{Volume: vol, Snapshot: "s"}) {
				t.Errorf("%s: parent link %s (parent %s) read back as %q %+v %v", at, link, parent, tree, ref, ok)
			}
		}
	}
}

// TestCloneAcrossTrees: the clone gesture between the trees of one mount.
// The root's store shown again under pools/ clones as in its own tree;
// between two stores it gets EXDEV, with a log line saying what to do;
// targets in no tree get clear errors. Nothing is created by a refusal.
func TestCloneAcrossTrees(t *testing.T) {
	ctx := context.Background()
	store, other := newStore(t), newStore(t)
	newVolume(t, store, "home", 8<<20, "write -P 0x21 0 2M")
	newVolume(t, other, "base", 8<<20, "write -P 0x31 1M 2M")
	for _, s := range []struct {
		store *snapshot.LocalStore
		vol   string
	}{{store, "home"}, {other, "base"}} {
		if _, err := s.store.CreateSnapshots(ctx, []string{s.vol}, "s1", snapshot.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	m := testMount(t, store, func(c *Config) {
		c.Pools = []Pool{{Name: "main", Backend: store}, {Name: "a", Backend: other}}
	})

	// The root's store again, as pools/main: a clone in the store.
	if err := os.Symlink("../pools/main/volumes/home/snapshots/s1", m.path("volumes", "kid")); err != nil {
		t.Fatal(err)
	}
	if link, err := os.Readlink(m.path("volumes", "kid", "parent")); err != nil || link != "../home/snapshots/s1" {
		t.Errorf("readlink volumes/kid/parent: %q, %v", link, err)
	}
	want, err := os.ReadFile(m.path("volumes", "home", "snapshots", "s1", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(m.path("volumes", "kid", "head.raw")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("volumes/kid/head.raw does not read as its parent: %v", err)
	}
	// In a pool's tree, from volumes/ as ln -s means it.
	if err := os.Symlink("../../../pools/a/volumes/base/snapshots/s1", m.path("pools", "a", "volumes", "kid2")); err != nil {
		t.Fatal(err)
	}
	if v, err := other.Volume(ctx, "kid2"); err != nil || v.Parent == nil || *v.Parent != (snapshot.SnapshotRef{Volume: "base", Snapshot: "s1"}) {
		t.Errorf("pools/a/volumes/kid2: %+v, %v", v, err)
	}

	// Between two stores: EXDEV, the log says to copy instead.
	mustFail(t, "ln -s from the root to pools/a", os.Symlink("../pools/a/volumes/base/snapshots/s1", m.path("volumes", "new")), syscall.EXDEV)
	if got := lines(m.log.String(), "cp pools/a/volumes/base/snapshots/s1/disk.raw import/new"); len(got) != 1 {
		t.Errorf("log after EXDEV:\n%s", m.log.String())
	}
	mustFail(t, "ln -s from pools/a to the root", os.Symlink("../../../volumes/home/snapshots/s1", m.path("pools", "a", "volumes", "new")), syscall.EXDEV)
	mustFail(t, "ln -s from pools/a to pools/main", os.Symlink("../../../main/volumes/home/snapshots/s1", m.path("pools", "a", "volumes", "new")), syscall.EXDEV)

	// Targets in no tree of the mount, or no snapshot.
	for _, tt := range []struct {
		target string
		want   syscall.Errno
	}{
		{"../../../nope/volumes/base/snapshots/s1", syscall.ENOENT},
		{"../../../pools/nope/volumes/base/snapshots/s1", syscall.ENOENT},
		{"../../../main/volumes/home/snapshots/nosuch", syscall.ENOENT},
		{"../../../main/volumes/nosuch/snapshots/s1", syscall.ENOENT},
		{"../../../../../../tmp/volumes/base/snapshots/s1", syscall.EINVAL},
		{m.path("pools", "a", "volumes", "base", "snapshots", "s1"), syscall.EINVAL},
	} {
		mustFail(t, "ln -s "+tt.target, os.Symlink(tt.target, m.path("pools", "a", "volumes", "new")), tt.want)
	}
	for _, s := range []*snapshot.LocalStore{store, other} {
		vols, err := s.ListVolumes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, v := range vols {
			names = append(names, v.Name)
		}
		if slices.Contains(names, "new") {
			t.Errorf("a refused clone left a volume: %q", names)
		}
	}
}
