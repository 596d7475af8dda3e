package fs

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"snapfs/snapshot"
)

// readDir returns the names in a directory of the mount, sorted.
func readDir(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	return names
}

func TestTreeSnapshots(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "vol", 64<<20, "write -P 0x11 0 1M", "write -P 0x12 32M 64k")
	m := mount(t, store)

	if got, want := readDir(t, m.dir), []string{"import", "instances", "volumes"}; !slices.Equal(got, want) {
		t.Fatalf("root: %v, want %v", got, want)
	}
	if got, want := readDir(t, m.path("volumes")), []string{"vol"}; !slices.Equal(got, want) {
		t.Fatalf("volumes: %v, want %v", got, want)
	}
	if got, want := readDir(t, m.path("volumes", "vol")), []string{"head.raw", "info.json", "snapshots"}; !slices.Equal(got, want) {
		t.Fatalf("volumes/vol: %v, want %v", got, want)
	}
	if got := readDir(t, m.path("volumes", "vol", "snapshots")); len(got) != 0 {
		t.Fatalf("snapshots of a new volume: %v", got)
	}

	snaps := m.path("volumes", "vol", "snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "vol", "write -P 0x21 512k 1M", "write -z 32M 64k")
	if err := os.Mkdir(filepath.Join(snaps, "s2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, want := readDir(t, snaps), []string{"latest", "s1", "s2"}; !slices.Equal(got, want) {
		t.Fatalf("snapshots: %v, want %v", got, want)
	}
	if got, want := readDir(t, filepath.Join(snaps, "s2")), []string{"disk.qcow2", "disk.raw", "meta.json", "parent"}; !slices.Equal(got, want) {
		t.Fatalf("snapshots/s2: %v, want %v", got, want)
	}
	if got, want := readDir(t, filepath.Join(snaps, "s1")), []string{"disk.qcow2", "disk.raw", "meta.json"}; !slices.Equal(got, want) {
		t.Fatalf("snapshots/s1: %v, want %v", got, want)
	}
	if target, err := os.Readlink(filepath.Join(snaps, "latest")); err != nil || target != "s2" {
		t.Fatalf("latest -> %q, %v; want s2", target, err)
	}
	if target, err := os.Readlink(filepath.Join(snaps, "s2", "parent")); err != nil || target != "../s1" {
		t.Fatalf("s2/parent -> %q, %v; want ../s1", target, err)
	}

	checkExports(t, m, "vol", "s1")
	checkExports(t, m, "vol", "s2")

	// meta.json is the model's snapshot.
	var meta snapshot.Snapshot
	data, err := os.ReadFile(filepath.Join(snaps, "s2", "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		t.Fatalf("meta.json: %v\n%s", err, data)
	}
	want, _ := store.Snapshot(t.Context(), "vol", "s2")
	if meta.Name != "s2" || meta.Parent != "s1" || meta.Size != 64<<20 || !meta.Created.Equal(want.Created) {
		t.Errorf("meta.json = %+v; want %+v", meta, want)
	}

	// mtime of a snapshot's files is its creation time.
	st, err := os.Stat(filepath.Join(snaps, "s2", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !st.ModTime().Equal(want.Created) {
		t.Errorf("disk.raw mtime %v, want the creation time %v", st.ModTime(), want.Created)
	}

	// rmdir of the middle snapshot: s2 reads as before, its parent goes.
	ref2 := filepath.Join(t.TempDir(), "s2.raw")
	copyFile(t, filepath.Join(snaps, "s2", "disk.raw"), ref2)
	if err := os.Remove(filepath.Join(snaps, "s1")); err != nil {
		t.Fatal(err)
	}
	if got, want := readDir(t, snaps), []string{"latest", "s2"}; !slices.Equal(got, want) {
		t.Fatalf("snapshots after rmdir s1: %v, want %v", got, want)
	}
	if _, err := os.Lstat(filepath.Join(snaps, "s2", "parent")); !os.IsNotExist(err) {
		t.Errorf("s2/parent after its parent went: %v", err)
	}
	sameContent(t, filepath.Join(snaps, "s2", "disk.raw"), ref2)
	checkExports(t, m, "vol", "s2")

	// Errors.
	mustFail(t, "mkdir of an existing snapshot", os.Mkdir(filepath.Join(snaps, "s2"), 0o755), syscall.EEXIST)
	mustFail(t, "mkdir latest", os.Mkdir(filepath.Join(snaps, "latest"), 0o755), syscall.EEXIST)
	mustFail(t, "mkdir .hidden", os.Mkdir(filepath.Join(snaps, ".hidden"), 0o755), syscall.EINVAL)
	mustFail(t, "mkdir with a control character", os.Mkdir(filepath.Join(snaps, "a\x01b"), 0o755), syscall.EINVAL)
	mustFail(t, "rmdir of a missing snapshot", os.Remove(filepath.Join(snaps, "nope")), syscall.ENOENT)
	// The mode says read-only (EACCES from the kernel); root passes
	// that check and gets EROFS from the node.
	wantWrite := syscall.EACCES
	if os.Geteuid() == 0 {
		wantWrite = syscall.EROFS
	}
	mustFail(t, "write to disk.raw", os.WriteFile(filepath.Join(snaps, "s2", "disk.raw"), []byte("x"), 0o644), wantWrite)
	mustFail(t, "mkdir in volumes/", os.Mkdir(m.path("volumes", "new"), 0o755), syscall.EPERM)
	mustFail(t, "rm disk.raw", os.Remove(filepath.Join(snaps, "s2", "disk.raw")), syscall.EPERM)

	// rmdir while a file of the snapshot is open: EBUSY.
	f, err := os.Open(filepath.Join(snaps, "s2", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	mustFail(t, "rmdir with an open file", os.Remove(filepath.Join(snaps, "s2")), syscall.EBUSY)
	f.Close()
	if err := os.Remove(filepath.Join(snaps, "s2")); err != nil {
		t.Fatalf("rmdir after close: %v", err)
	}
	if got := readDir(t, snaps); len(got) != 0 {
		t.Fatalf("snapshots after deleting all: %v", got)
	}
}

// copyFile copies a file of the mount out, for a reference.
func copyFile(t testing.TB, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
