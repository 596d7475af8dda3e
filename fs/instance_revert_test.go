package fs

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"snapfs/snapshot"
)

// revertingStore is the local store's instances with an InstanceReverter
// that records what it is asked: the libvirt provider, which reverts for
// real, is tested through the mount in cmd/snapfs (TestMountLibvirt).
type revertingStore struct {
	*snapshot.LocalStore
	mu       sync.Mutex
	reverted []string
}

func (s *revertingStore) RevertInstance(ctx context.Context, instance, name string) error {
	if _, err := s.InstanceSnapshot(ctx, instance, name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reverted = append(s.reverted, instance+"@"+name)
	return nil
}

// TestInstanceRevertFile: instances/I/revert is write-only; each line
// written reverts to the snapshot it names, with the provider's error as
// the write's (so that the shell reports it); a provider that cannot
// revert gives ENOTSUP.
func TestInstanceRevertFile(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "root", 4<<20)
	if _, err := store.CreateInstance(t.Context(), "vm", []snapshot.Disk{{Device: "vda", Volume: "root"}}); err != nil {
		t.Fatal(err)
	}
	rs := &revertingStore{LocalStore: store}
	m := testMount(t, store, func(c *Config) { c.Instances = rs })
	if err := os.Mkdir(m.path("instances/vm/snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctl := m.path("instances/vm/revert")
	fi, err := os.Stat(ctl)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o444 != 0 || fi.Mode().Perm()&0o200 == 0 || fi.Size() != 0 {
		t.Errorf("revert: mode %v size %d, want write-only and empty", fi.Mode(), fi.Size())
	}
	if _, err := os.ReadFile(ctl); !errors.Is(err, syscall.EACCES) {
		t.Errorf("read revert: %v, want EACCES", err)
	}

	// The shell's gesture, with the shell's report of an error.
	if out, err := exec.Command("bash", "-c", "echo s1 > "+ctl).CombinedOutput(); err != nil {
		t.Fatalf("echo s1 > revert: %v\n%s", err, out)
	}
	out, err := exec.Command("bash", "-c", "echo nope > "+ctl).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No such file or directory") {
		t.Errorf("echo nope > revert: %v, %q: want the shell to report ENOENT", err, out)
	}
	// A last line without a newline runs at close; blanks are trimmed.
	if err := os.WriteFile(ctl, []byte("  s1 "), 0); err != nil {
		t.Errorf("write s1 without newline: %v", err)
	}
	if want := []string{"vm@s1", "vm@s1"}; !slices.Equal(rs.reverted, want) {
		t.Errorf("reverted %q, want %q", rs.reverted, want)
	}
}

// TestInstanceRevertUnsupported: the local store's instances revert
// volume by volume, not as a whole: ENOTSUP, and nothing changes.
func TestInstanceRevertUnsupported(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "root", 4<<20)
	if _, err := store.CreateInstance(t.Context(), "vm", []snapshot.Disk{{Device: "vda", Volume: "root"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store)
	if err := os.Mkdir(m.path("instances/vm/snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.path("instances/vm/revert"), []byte("s1\n"), 0); !errors.Is(err, syscall.ENOTSUP) {
		t.Errorf("echo s1 > revert on a store instance: %v, want ENOTSUP", err)
	}
	if got := readDir(t, filepath.Join(m.path("instances/vm/snapshots"))); !slices.Equal(got, []string{"s1"}) {
		t.Errorf("snapshots after a refused revert: %q", got)
	}
}

// TestInstanceRevertReadOnly: a read-only mount refuses the gesture.
func TestInstanceRevertReadOnly(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "root", 4<<20)
	if _, err := store.CreateInstance(t.Context(), "vm", []snapshot.Disk{{Device: "vda", Volume: "root"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store, func(c *Config) { c.ReadOnly = true })
	if err := os.WriteFile(m.path("instances/vm/revert"), []byte("s1\n"), 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write revert on a read-only mount: %v, want EROFS", err)
	}
}
