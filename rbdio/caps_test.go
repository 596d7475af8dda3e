//go:build ceph && cgo

package rbdio

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/snapshot"
)

// TestRestrictedClient: clients whose caps name one pool, as Ceph's
// documentation makes one for each service, list the volumes and
// snapshots of that pool and read them, as `rbd ls` and `rbd snap ls` do
// with the same keys, although librbd's search for clones reaches pools
// they may not read: a reader (osd 'profile rbd-read-only pool=P') may
// not read the other pools' lists of format-1 clones, and a tenant (osd
// 'profile rbd pool=P') may not open a clone made in another pool.
//
// A clone whose parent the client may not read, which librbd cannot open
// for it, is left out of the listing (as rbd ls -l leaves it out) and its
// lookup says why. A snapshot delete, which must know the clones, fails
// and says why when the client cannot see them all.
func TestRestrictedClient(t *testing.T) {
	c := ctx(t)
	own := tempPool(t, "snapfs-own")
	// client opens the pool own as a client whose osd caps are caps.
	client := func(t *testing.T, caps string) *Pool {
		t.Helper()
		id := uniqueName(t, "restricted")
		keyring := filepath.Join(t.TempDir(), "keyring")
		cli(t, "ceph", "auth", "get-or-create", "client."+id, "mon", "profile rbd", "osd", caps+" pool="+own, "-o", keyring)
		t.Cleanup(func() { cli(t, "ceph", "auth", "del", "client."+id) })
		cl, err := Open(Config{CephConf: cephConf, ID: id, Keyring: keyring, Pools: []string{own}, Timeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		// A pool the key may not read fails the open, saying so.
		other, err := Open(Config{CephConf: cephConf, ID: id, Keyring: keyring, Pools: []string{own, testPool}, Timeout: 30 * time.Second})
		if err == nil {
			other.Close()
		}
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "may not list the images of pool") {
			t.Errorf("open with a pool the key may not read: %v, want ErrConfig saying so", err)
		}
		return cl.Pools()[0]
	}

	// As admin: in own, a volume whose snapshot s1 has a clone in the test
	// pool, and a clone of a snapshot of the test pool.
	adm, err := Open(Config{CephConf: cephConf, Pools: []string{testPool, own}, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { adm.Close() }) // after the volumes' cleanups
	other, mine := adm.Pools()[0], adm.Pools()[1]
	path, _ := sparseRaw(t, 16<<20)
	vol := uniqueName(t, "mine")
	importFile(t, mine, path, vol, nil)
	t.Cleanup(func() { mine.DeleteVolume(ctx(t), vol) })
	snap(t, mine, vol, "s1")
	parent := base(t, other)
	for _, cl := range []struct {
		from, to  *Pool
		vol, snap string
	}{{mine, other, vol, "s1"}, {other, mine, parent, "base"}} {
		name := uniqueName(t, "clone")
		if _, err := cl.from.CloneInto(c, cl.vol, cl.snap, cl.to, name); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.to.DeleteVolume(ctx(t), name) })
	}
	// Checked by admin: the snapshot s1 of vol (in own), and its clone.
	want := rbdExport(t, own+"/"+vol+"@s1")

	for _, caps := range []string{"profile rbd", "profile rbd-read-only"} {
		t.Run(strings.ReplaceAll(caps, " ", "-"), func(t *testing.T) {
			p := client(t, caps)
			vols, err := p.ListVolumes(c)
			if err != nil {
				t.Fatalf("list the volumes of the client's own pool: %v", err)
			}
			var names []string
			for _, v := range vols {
				names = append(names, v.Name)
			}
			if !slices.Equal(names, []string{vol}) {
				t.Errorf("volumes: %q, want [%s] (the clone of a snapshot it may not read left out)", names, vol)
			}
			snaps, err := p.ListSnapshots(c, vol)
			if err != nil {
				t.Fatalf("list the snapshots of a volume of the client's own pool: %v", err)
			}
			if len(snaps) != 1 || snaps[0].Name != "s1" {
				t.Fatalf("snapshots: %+v, want s1", snaps)
			}
			im, err := p.OpenSnapshot(c, vol, "s1")
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if got := readAll(t, im, 1<<20); !slices.Equal(got, want) {
				t.Errorf("the snapshot read by the restricted client differs from rbd export")
			}
			if caps != "profile rbd" {
				return
			}
			// s1 has a clone the tenant cannot see: refused, and it says why.
			err = p.DeleteSnapshot(c, vol, "s1")
			if !errors.Is(err, syscall.EPERM) || !strings.Contains(err.Error(), "every pool") {
				t.Errorf("delete a snapshot whose clones the client cannot see: %v, want EPERM saying why", err)
			}
			if _, err := mine.Snapshot(c, vol, "s1"); err != nil {
				t.Errorf("the refused delete removed the snapshot: %v", err)
			}
			// One without clones it takes and deletes.
			if _, err := p.CreateSnapshots(c, []string{vol}, "s2", snapshot.SnapshotOptions{}); err != nil {
				t.Fatalf("snapshot as the restricted client: %v", err)
			}
			if err := p.DeleteSnapshot(c, vol, "s2"); err != nil {
				t.Errorf("delete a snapshot without clones as the restricted client: %v", err)
			}
		})
	}
}
