package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// TestCloneParentFlatten: a clone shows its parent snapshot as a relative
// link that resolves inside the mount; rm of the link flattens the clone,
// which then reads the same and has no parent.
func TestCloneParentFlatten(t *testing.T) {
	ctx := context.Background()
	store := newStore(t)
	newVolume(t, store, "base", 16<<20, "write -P 0x11 0 4M", "write -P 0x12 8M 1M")
	if _, err := store.CreateSnapshots(ctx, []string{"base"}, "s1", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Clone(ctx, "base", "s1", "kid"); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "kid", "write -P 0x33 1M 1M")
	m := testMount(t, store)

	if got, want := readDir(t, m.path("volumes", "kid")), []string{"head.raw", "info.json", "parent", "revert", "snapshots"}; !slices.Equal(got, want) {
		t.Fatalf("volumes/kid: %v, want %v", got, want)
	}
	if got := readDir(t, m.path("volumes", "base")); slices.Contains(got, "parent") {
		t.Fatalf("a volume that is no clone has a parent link: %v", got)
	}
	link := m.path("volumes", "kid", "parent")
	target, err := os.Readlink(link)
	if err != nil {
		t.Fatal(err)
	}
	if want := "../base/snapshots/s1"; target != want {
		t.Fatalf("parent -> %q, want %q", target, want)
	}
	// The link resolves inside the mount, to the snapshot's folder.
	parentRaw, err := os.ReadFile(filepath.Join(link, "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	// base was not written after s1: its head reads as s1.
	if want := qemutest.ConvertRaw(t, headPath(t, store, "base")); !bytes.Equal(parentRaw, want) {
		t.Fatal("parent/disk.raw differs from qemu-img convert of base")
	}
	before, err := os.ReadFile(m.path("volumes", "kid", "head.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if want := qemutest.ConvertRaw(t, headPath(t, store, "kid")); !bytes.Equal(before, want) {
		t.Fatal("the clone's head.raw differs from qemu-img convert of its chain")
	}
	// A snapshot with clones cannot be deleted.
	if err := os.Remove(m.path("volumes", "base", "snapshots", "s1")); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("rmdir of a snapshot with a clone: %v, want EBUSY", err)
	}
	// rmdir can only say EBUSY: the log names the clones.
	if logged := m.log.String(); !strings.Contains(logged, "rmdir s1") || !strings.Contains(logged, "has clones (kid)") {
		t.Fatalf("the log does not name the clones:\n%s", logged)
	}
	// Nothing else in a volume directory can be removed.
	if err := os.Remove(m.path("volumes", "kid", "info.json")); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("rm info.json: %v, want EPERM", err)
	}

	// rm parent flattens.
	if out, err := exec.Command("rm", link).CombinedOutput(); err != nil {
		t.Fatalf("rm parent: %v: %s", err, out)
	}
	v, err := store.Volume(ctx, "kid")
	if err != nil {
		t.Fatal(err)
	}
	if v.Parent != nil {
		t.Fatalf("after rm parent the clone still has parent %v", *v.Parent)
	}
	if _, err := os.Lstat(link); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("parent link after flatten: %v", err)
	}
	after, err := os.ReadFile(m.path("volumes", "kid", "head.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, before) {
		t.Fatal("the flattened clone reads differently")
	}
	if want := qemutest.ConvertRaw(t, headPath(t, store, "kid")); !bytes.Equal(after, want) {
		t.Fatal("the flattened clone differs from qemu-img convert of its chain")
	}
	// Its parent snapshot is free now.
	if err := os.Remove(m.path("volumes", "base", "snapshots", "s1")); err != nil {
		t.Fatalf("rmdir after flatten: %v", err)
	}
}

// TestRevertGesture: `echo S > volumes/V/revert` makes the head equal to
// S again and keeps every snapshot; an unknown snapshot fails the write.
func TestRevertGesture(t *testing.T) {
	ctx := context.Background()
	store := newStore(t)
	newVolume(t, store, "vol", 8<<20, "write -P 0x11 0 2M")
	m := testMount(t, store)
	snaps := m.path("volumes", "vol", "snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "vol", "write -P 0x22 1M 2M")
	if err := os.Mkdir(filepath.Join(snaps, "s2"), 0o755); err != nil {
		t.Fatal(err)
	}
	s1, err := os.ReadFile(filepath.Join(snaps, "s1", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	ctl := m.path("volumes", "vol", "revert")
	if out, err := exec.Command("bash", "-c", `echo s1 > "$1"`, "bash", ctl).CombinedOutput(); err != nil {
		t.Fatalf("echo s1 > revert: %v: %s", err, out)
	}
	head, err := os.ReadFile(m.path("volumes", "vol", "head.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(head, s1) {
		t.Fatal("after the revert the head differs from s1")
	}
	if want := qemutest.ConvertRaw(t, headPath(t, store, "vol")); !bytes.Equal(head, want) {
		t.Fatal("head.raw differs from qemu-img convert of the reverted chain")
	}
	list, err := store.ListSnapshots(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("snapshots after the revert: %v, want s1 and s2 kept", list)
	}
	out, err := exec.Command("bash", "-c", `echo nosuch > "$1"`, "bash", ctl).CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("No such file or directory")) {
		t.Fatalf("echo nosuch > revert: %v: %s, want ENOENT reported", err, out)
	}
}

// headPath is the file of a volume's head in the store.
func headPath(t testing.TB, store *snapshot.LocalStore, volume string) string {
	t.Helper()
	v, err := store.Volume(context.Background(), volume)
	if err != nil {
		t.Fatal(err)
	}
	return v.HeadPath
}

// TestSinceRsync: snapshots/S2/since/S1.qcow2 is an overlay of what changed
// since S1; the snapshots folder copied with rsync -a is a chain that
// qemu-img flattens to exactly S2, and a second rsync transfers nothing.
func TestSinceRsync(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "vol", 64<<20, "write -P 0x11 0 16M")
	m := testMount(t, store)
	snaps := m.path("volumes", "vol", "snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "vol", "write -P 0x22 1M 1M", "write -z 8M 64k", "write -P 0x33 40M 128k")
	if err := os.Mkdir(filepath.Join(snaps, "s2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, want := readDir(t, filepath.Join(snaps, "s2", "since")), []string{"s1.qcow2"}; !slices.Equal(got, want) {
		t.Fatalf("s2/since: %v, want %v", got, want)
	}
	if got := readDir(t, filepath.Join(snaps, "s1", "since")); len(got) != 0 {
		t.Fatalf("since/ of the first snapshot: %v", got)
	}
	since := filepath.Join(snaps, "s2", "since", "s1.qcow2")
	st, err := os.Stat(since)
	if err != nil {
		t.Fatal(err)
	}
	// 1 MiB + 64 KiB + 128 KiB changed of 16 MiB of data: the overlay
	// holds the change and metadata, not the volume.
	if st.Size() > 4<<20 {
		t.Fatalf("since/s1.qcow2 is %d bytes for about 1.2 MiB changed", st.Size())
	}

	backup := filepath.Join(t.TempDir(), "backup")
	rsync := func() []byte {
		out, err := exec.Command("rsync", "-a", "--stats", snaps+"/", backup+"/").CombinedOutput()
		if err != nil {
			t.Fatalf("rsync: %v: %s", err, out)
		}
		return out
	}
	rsync()
	qemutest.Check(t, filepath.Join(backup, "s2", "since", "s1.qcow2"))
	want, err := os.ReadFile(filepath.Join(snaps, "s2", "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if got := qemutest.ConvertRaw(t, filepath.Join(backup, "s2", "since", "s1.qcow2")); !bytes.Equal(got, want) {
		t.Fatal("the copied incremental chain, flattened by qemu-img, differs from s2")
	}
	if out := rsync(); !bytes.Contains(out, []byte("Number of regular files transferred: 0")) {
		t.Fatalf("a second rsync transferred files:\n%s", out)
	}
}

// TestCloneGesture: ln -s ../V/snapshots/S volumes/NEW makes a clone, whose
// directory shows at once; a chain of such clones 16 deep, each writing its
// own part, reads through the mount as qemu-img reads its chain.
func TestCloneGesture(t *testing.T) {
	ctx := context.Background()
	store := newStore(t)
	newVolume(t, store, "v0", 32<<20, "write -P 0x10 0 32M")
	m := testMount(t, store)
	vols := m.path("volumes")

	const depth = 16
	for i := 1; i <= depth; i++ {
		prev, next := fmt.Sprintf("v%d", i-1), fmt.Sprintf("v%d", i)
		if err := os.Mkdir(filepath.Join(vols, prev, "snapshots", "s"), 0o755); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("ln", "-s", "../"+prev+"/snapshots/s", filepath.Join(vols, next)).CombinedOutput(); err != nil {
			t.Fatalf("ln -s clone %s: %v: %s", next, err, out)
		}
		// The clone's directory shows at once, with its parent link.
		if got := readDir(t, filepath.Join(vols, next)); !slices.Contains(got, "parent") || !slices.Contains(got, "head.raw") {
			t.Fatalf("volumes/%s after ln -s: %v", next, got)
		}
		writeHead(t, store, next, fmt.Sprintf("write -P 0x%x %dM 1M", 0x20+i, i))
	}
	v, err := store.Volume(ctx, fmt.Sprintf("v%d", depth))
	if err != nil {
		t.Fatal(err)
	}
	if v.Parent == nil || v.Parent.Volume != fmt.Sprintf("v%d", depth-1) {
		t.Fatalf("the last clone's parent: %+v", v.Parent)
	}
	got, err := os.ReadFile(filepath.Join(vols, fmt.Sprintf("v%d", depth), "head.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if want := qemutest.ConvertRaw(t, v.HeadPath); !bytes.Equal(got, want) {
		t.Fatalf("a clone %d deep reads differently from qemu-img convert of its chain", depth)
	}

	// Refusals: a target that is not a snapshot of this tree (EINVAL; the
	// latest link included, though it resolves to one), a snapshot that
	// does not exist (ENOENT), a taken name.
	for _, tc := range []struct {
		target string
		want   syscall.Errno
	}{
		{"/etc/passwd", syscall.EINVAL},
		{"../v0", syscall.EINVAL},
		{"../../x/snapshots/s", syscall.EINVAL},
		{"../v0/snapshots/latest", syscall.EINVAL},
		{"../v0/snapshots/nosuch", syscall.ENOENT},
	} {
		if err := os.Symlink(tc.target, filepath.Join(vols, "bad")); !errors.Is(err, tc.want) {
			t.Errorf("ln -s %s: %v, want %v", tc.target, err, tc.want)
		}
	}
	if err := os.Symlink("../v0/snapshots/s", filepath.Join(vols, "v1")); !errors.Is(err, syscall.EEXIST) {
		t.Fatalf("ln -s onto an existing volume: %v, want EEXIST", err)
	}
}

// TestCloneGesturesReadOnly: on a read-only mount the clone, flatten and
// revert gestures fail with EROFS and change nothing.
func TestCloneGesturesReadOnly(t *testing.T) {
	ctx := context.Background()
	store := newStore(t)
	newVolume(t, store, "base", 4<<20, "write -P 0x11 0 1M")
	if _, err := store.CreateSnapshots(ctx, []string{"base"}, "s1", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Clone(ctx, "base", "s1", "kid"); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store, func(c *Config) { c.ReadOnly = true })
	mustFail(t, "ln -s clone", os.Symlink("../base/snapshots/s1", m.path("volumes", "new")), syscall.EROFS)
	mustFail(t, "rm parent", os.Remove(m.path("volumes", "kid", "parent")), syscall.EROFS)
	mustFail(t, "write revert", os.WriteFile(m.path("volumes", "base", "revert"), []byte("s1\n"), 0o200), syscall.EROFS)
	if _, err := store.Volume(ctx, "new"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("volume new after a refused clone: %v", err)
	}
	if v, err := store.Volume(ctx, "kid"); err != nil || v.Parent == nil {
		t.Errorf("kid after a refused flatten: %+v, %v", v, err)
	}
}
