package fs

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"snapfs/internal/qemutest"
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
	m := testMount(t, store)

	if got, want := readDir(t, m.dir), []string{"import", "instances", "volumes"}; !slices.Equal(got, want) {
		t.Fatalf("root: %v, want %v", got, want)
	}
	if got, want := readDir(t, m.path("volumes")), []string{"vol"}; !slices.Equal(got, want) {
		t.Fatalf("volumes: %v, want %v", got, want)
	}
	if got, want := readDir(t, m.path("volumes", "vol")), []string{"head.raw", "info.json", "revert", "snapshots"}; !slices.Equal(got, want) {
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
	if got, want := readDir(t, filepath.Join(snaps, "s2")), []string{"disk.qcow2", "disk.raw", "meta.json", "parent", "since"}; !slices.Equal(got, want) {
		t.Fatalf("snapshots/s2: %v, want %v", got, want)
	}
	if got, want := readDir(t, filepath.Join(snaps, "s1")), []string{"disk.qcow2", "disk.raw", "meta.json", "since"}; !slices.Equal(got, want) {
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

// inodes returns the inode number of each path.
func inodes(t testing.TB, paths ...string) []uint64 {
	t.Helper()
	var out []uint64
	for _, p := range paths {
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, st.Sys().(*syscall.Stat_t).Ino)
	}
	return out
}

// TestInodesStable: inode numbers come from identity: the same across
// remounts, different for a snapshot deleted and taken again under its
// name (whose cached pages must not be served for the new one).
func TestInodesStable(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 1M")
	rel := []string{
		"volumes", "volumes/v", "volumes/v/head.raw", "volumes/v/info.json",
		"volumes/v/snapshots", "volumes/v/snapshots/s", "volumes/v/snapshots/s/disk.raw",
		"volumes/v/snapshots/s/disk.qcow2", "volumes/v/snapshots/s/meta.json",
	}
	paths := func(m *mounted) []string {
		var out []string
		for _, r := range rel {
			out = append(out, m.path(r))
		}
		return out
	}
	m1 := testMount(t, store)
	if err := os.Mkdir(m1.path("volumes/v/snapshots/s"), 0o755); err != nil {
		t.Fatal(err)
	}
	first := inodes(t, paths(m1)...)
	m2 := testMount(t, store)
	if second := inodes(t, paths(m2)...); !slices.Equal(first, second) {
		t.Errorf("inodes differ across mounts:\n%v\n%v", first, second)
	}
	seen := map[uint64]string{}
	for i, ino := range first {
		if other, ok := seen[ino]; ok {
			t.Errorf("%s and %s share inode %d", rel[i], other, ino)
		}
		seen[ino] = rel[i]
	}

	// Taken again under the same name, with other data: new inodes, and
	// the new data is read (not the old snapshot's cached pages).
	old, err := os.ReadFile(m1.path("volumes/v/snapshots/s/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(m1.path("volumes/v/snapshots/s")); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "v", "write -P 2 0 1M")
	if err := os.Mkdir(m1.path("volumes/v/snapshots/s"), 0o755); err != nil {
		t.Fatal(err)
	}
	again := inodes(t, m1.path("volumes/v/snapshots/s"), m1.path("volumes/v/snapshots/s/disk.raw"))
	if again[0] == first[5] || again[1] == first[6] {
		t.Errorf("a new snapshot took the inodes of a deleted one: %v, %v", again, first[5:7])
	}
	data, err := os.ReadFile(m1.path("volumes/v/snapshots/s/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(data, old) || data[0] != 2 {
		t.Errorf("the new snapshot s reads the old one's data")
	}
}

// TestHeadNotCached: head.raw shows what the head holds now, read after
// read, and info.json what the volume is now.
func TestHeadNotCached(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 1M")
	m := testMount(t, store)
	head := m.path("volumes/v/head.raw")
	for i, pattern := range []byte{1, 2, 3} {
		if i > 0 {
			writeHead(t, store, "v", fmt.Sprintf("write -P %d 0 1M", pattern))
		}
		data, err := os.ReadFile(head)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) != 4<<20 || data[0] != pattern || data[1<<20-1] != pattern {
			t.Fatalf("head.raw after writing %d: reads %d", pattern, data[0])
		}
	}
	var info struct {
		Snapshots []string `json:"snapshots"`
		HeadPath  string   `json:"head_path"`
		Size      int64    `json:"size"`
	}
	for _, snap := range []string{"a", "b"} {
		if err := os.Mkdir(m.path("volumes/v/snapshots", snap), 0o755); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(m.path("volumes/v/info.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &info); err != nil {
			t.Fatal(err)
		}
		if info.Snapshots[len(info.Snapshots)-1] != snap || info.Size != 4<<20 || info.HeadPath == "" {
			t.Errorf("info.json after snapshot %s: %s", snap, data)
		}
	}
	// The head's path is one qemu-img opens, with the chain.
	qemutest.Compare(t, info.HeadPath, head)
}

// TestInstances: an instance's disks, and its snapshots, which take every
// disk at one point.
func TestInstances(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "root", 8<<20, "write -P 0x0a 0 2M")
	newVolume(t, store, "data", 4<<20, "write -P 0x0d 1M 1M")
	if _, err := store.CreateInstance(t.Context(), "vm", []snapshot.Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "data"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store)
	if got := readDir(t, m.path("instances")); !slices.Equal(got, []string{"vm"}) {
		t.Fatalf("instances: %v", got)
	}
	if got := readDir(t, m.path("instances/vm")); !slices.Equal(got, []string{"disks", "info.json", "revert", "snapshots"}) {
		t.Fatalf("instances/vm: %v", got)
	}
	if target, err := os.Readlink(m.path("instances/vm/disks/vdb")); err != nil || target != "../../../volumes/data" {
		t.Fatalf("disks/vdb -> %q, %v", target, err)
	}
	// The link leads to the volume.
	if _, err := os.Stat(m.path("instances/vm/disks/vda/head.raw")); err != nil {
		t.Fatalf("through disks/vda: %v", err)
	}

	snaps := m.path("instances/vm/snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := readDir(t, filepath.Join(snaps, "s1")); !slices.Equal(got, []string{"meta.json", "vda.qcow2", "vda.raw", "vdb.qcow2", "vdb.raw"}) {
		t.Fatalf("instance snapshot: %v", got)
	}
	var meta snapshot.InstanceSnapshot
	data, err := os.ReadFile(filepath.Join(snaps, "s1", "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		t.Fatal(err)
	}
	if meta.Name != "s1" || len(meta.Disks) != 2 || meta.Consistency != snapshot.CrashConsistent {
		t.Errorf("meta.json: %s", data)
	}
	for _, d := range meta.Disks {
		ref := qemutest.ConvertRawFile(t, snapshotPath(t, store, d.Volume, d.Snapshot))
		sameContent(t, filepath.Join(snaps, "s1", d.Device+".raw"), ref)
		qemutest.Check(t, filepath.Join(snaps, "s1", d.Device+".qcow2"))
		qemutest.Compare(t, filepath.Join(snaps, "s1", d.Device+".qcow2"), ref)
		// The volume's own view of the same snapshot.
		sameContent(t, m.path("volumes", d.Volume, "snapshots", d.Snapshot, "disk.raw"), ref)
	}

	// A file of the instance snapshot open: EBUSY.
	f, err := os.Open(filepath.Join(snaps, "s1", "vdb.raw"))
	if err != nil {
		t.Fatal(err)
	}
	mustFail(t, "rmdir with vdb.raw open", os.Remove(filepath.Join(snaps, "s1")), syscall.EBUSY)
	f.Close()
	if err := os.Remove(filepath.Join(snaps, "s1")); err != nil {
		t.Fatal(err)
	}
	if got := readDir(t, snaps); len(got) != 0 {
		t.Errorf("instance snapshots after rmdir: %v", got)
	}
	for _, v := range []string{"root", "data"} {
		if got := readDir(t, m.path("volumes", v, "snapshots")); len(got) != 0 {
			t.Errorf("volume %s keeps snapshots of a deleted instance snapshot: %v", v, got)
		}
	}
}

// TestRmdirAfterClose: the kernel releases a file after close(2) returns;
// an rmdir right after reading a snapshot must not see it still open.
func TestRmdirAfterClose(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 1M")
	m := testMount(t, store)
	snap := m.path("volumes/v/snapshots/s")
	for i := range 20 {
		if err := os.Mkdir(snap, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"disk.raw", "disk.qcow2"} {
			if _, err := os.ReadFile(filepath.Join(snap, f)); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Remove(snap); err != nil {
			t.Fatalf("round %d: rmdir right after close: %v", i, err)
		}
	}
}

// TestLongSnapshotNames: mkdir takes a snapshot whose name leaves room for
// since/NAME.qcow2 in the later snapshots (249 bytes), and refuses a longer
// one with EINVAL, which would have made since/ list a name no filesystem
// holds (cp -r and rsync -a of snapshots/ would fail).
func TestLongSnapshotNames(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 1M")
	m := testMount(t, store)
	snaps := m.path("volumes/v/snapshots")
	longest := strings.Repeat("n", 249)
	mustFail(t, "mkdir of a 250-byte name", os.Mkdir(filepath.Join(snaps, longest+"n"), 0o755), syscall.EINVAL)
	for _, name := range []string{longest, "next"} {
		if err := os.Mkdir(filepath.Join(snaps, name), 0o755); err != nil {
			t.Fatalf("mkdir %d bytes: %v", len(name), err)
		}
	}
	since := filepath.Join(snaps, "next", "since", longest+".qcow2")
	if _, err := os.Stat(since); err != nil {
		t.Fatalf("since/ of the 249-byte name: %v", err)
	}
	qemutest.Check(t, since)
}

// TestOpenMetaOutlivesRmdir: meta.json is read whole at open, so it does
// not hold its snapshot (rmdir goes on, unlike with disk.raw open), and
// its reader keeps the document: fstat and read of the open file answer
// after the snapshot is gone (cat does both).
func TestOpenMetaOutlivesRmdir(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 1M")
	m := testMount(t, store)
	dir := m.path("volumes/v/snapshots/s")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(dir, "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.Remove(dir); err != nil {
		t.Fatalf("rmdir with meta.json open: %v", err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatalf("fstat of meta.json after rmdir: %v", err)
	}
	got, err := io.ReadAll(f)
	if err != nil {
		t.Fatalf("read of meta.json after rmdir: %v", err)
	}
	if !bytes.Equal(got, want) || st.Size() != int64(len(want)) {
		t.Errorf("meta.json after rmdir: %d bytes (stat %d), want the %d read before", len(got), st.Size(), len(want))
	}
}

// TestOpenHeadLive: head.raw kept open reads what the head holds now:
// clusters that qemu allocated after the open (a chain keeps the L2
// tables it read), and the new head of a snapshot taken after the open.
func TestOpenHeadLive(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "v", 4<<20, "write -P 1 0 64k")
	m := testMount(t, store)
	f, err := os.Open(m.path("volumes/v/head.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	at := func(off int64) byte {
		t.Helper()
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b[0]
	}
	if got := at(3 << 20); got != 0 {
		t.Fatalf("head.raw at 3M before any write there: %d", got)
	}
	writeHead(t, store, "v", "write -P 2 3M 64k")
	if got := at(3 << 20); got != 2 {
		t.Errorf("the open head.raw at 3M after qemu allocated it: %d, want 2", got)
	}
	if err := os.Mkdir(m.path("volumes/v/snapshots/s"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "v", "write -P 3 2M 64k")
	if got, old := at(2<<20), at(3<<20); got != 3 || old != 2 {
		t.Errorf("the open head.raw after a snapshot and a write to the new head: %d at 2M (want 3), %d at 3M (want 2)", got, old)
	}
}
