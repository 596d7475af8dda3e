package fs

import (
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"snapfs/snapshot"
)

// TestInstanceRmdirBusyLogged: rmdir of an instance snapshot that a clone
// depends on gets EBUSY, deletes none of its disk snapshots, and, since
// rmdir can only say EBUSY, the log names the clone, as for a volume's
// snapshot.
func TestInstanceRmdirBusyLogged(t *testing.T) {
	ctx := t.Context()
	store := newStore(t)
	newVolume(t, store, "root", 4<<20, "write -P 0x0a 0 1M")
	newVolume(t, store, "data", 4<<20, "write -P 0x0d 1M 1M")
	if _, err := store.CreateInstance(ctx, "vm", []snapshot.Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "data"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store)
	snaps := m.path("instances/vm/snapshots")
	if err := os.Mkdir(snaps+"/s1", 0o755); err != nil {
		t.Fatal(err)
	}
	// A clone of the second disk's snapshot: the first disk's could
	// go, the instance snapshot cannot.
	if err := os.Symlink("../data/snapshots/s1", m.path("volumes", "kid")); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "rmdir of an instance snapshot with a clone", os.Remove(snaps+"/s1"), syscall.EBUSY)
	for _, vol := range []string{"root", "data"} {
		if got := readDir(t, m.path("volumes", vol, "snapshots")); !slices.Contains(got, "s1") {
			t.Errorf("volumes/%s/snapshots after the refused rmdir: %v", vol, got)
		}
	}
	if logged := m.log.String(); !strings.Contains(logged, "rmdir vm/snapshots/s1") || !strings.Contains(logged, "has clones (kid)") {
		t.Fatalf("the log does not say why rmdir failed:\n%s", logged)
	}
	if _, err := store.InstanceSnapshot(ctx, "vm", "s1"); err != nil {
		t.Fatalf("the instance snapshot after the refused rmdir: %v", err)
	}
}
