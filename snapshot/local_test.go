package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// openStore opens a new store in a temp directory, closed at the end.
func openStore(t *testing.T) *LocalStore {
	t.Helper()
	return reopen(t, t.TempDir())
}

// reopen opens the store in dir, closed at the end of the test.
func reopen(t *testing.T, dir string) *LocalStore {
	t.Helper()
	s, err := OpenLocal(dir)
	if err != nil {
		t.Fatalf("OpenLocal(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// readImage reads a whole image through ReadAt, in odd-sized pieces so
// that reads cross cluster boundaries, and closes it.
func readImage(t *testing.T, img qcow.Image) []byte {
	t.Helper()
	defer img.Close()
	out := make([]byte, img.Size())
	for off := 0; off < len(out); {
		n := min(len(out)-off, 300_000)
		if _, err := img.ReadAt(out[off:off+n], int64(off)); err != nil && err != io.EOF {
			t.Fatalf("read at %d: %v", off, err)
		}
		off += n
	}
	return out
}

func mustVolume(t *testing.T, s *LocalStore, name string, size int64) Volume {
	t.Helper()
	v, err := s.CreateVolume(context.Background(), name, size)
	if err != nil {
		t.Fatalf("CreateVolume(%s): %v", name, err)
	}
	return v
}

func mustSnapshot(t *testing.T, s *LocalStore, vol, name string) Snapshot {
	t.Helper()
	snaps, err := s.CreateSnapshots(context.Background(), []string{vol}, name, SnapshotOptions{})
	if err != nil {
		t.Fatalf("snapshot %s@%s: %v", vol, name, err)
	}
	return snaps[0]
}

// headPath returns the current head file of a volume.
func headPath(t *testing.T, s *LocalStore, vol string) string {
	t.Helper()
	v, err := s.Volume(context.Background(), vol)
	if err != nil {
		t.Fatal(err)
	}
	return v.HeadPath
}

// writeHead writes into a volume's head with qemu-io, as a VM would.
func writeHead(t *testing.T, s *LocalStore, vol string, cmds ...string) {
	t.Helper()
	qemutest.IO(t, headPath(t, s, vol), cmds...)
}

// state is what every snapshot of a volume and its head read, by name
// ("" for the head).
type state map[string][]byte

// capture reads every snapshot and the head of vol through the store, and
// checks each against qemu-img's flattening of the same layer file, and
// each layer file with qemu-img check.
func capture(t *testing.T, s *LocalStore, vol string) state {
	t.Helper()
	return captureWith(t, s, vol, true)
}

// captureWith is capture, with or without qemu-img as the oracle.
func captureWith(t *testing.T, s *LocalStore, vol string, oracle bool) state {
	t.Helper()
	ctx := context.Background()
	st := state{}
	snaps, err := s.ListSnapshots(ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	for _, snap := range snaps {
		img, err := s.OpenSnapshot(ctx, vol, snap.Name)
		if err != nil {
			t.Fatalf("open %s@%s: %v", vol, snap.Name, err)
		}
		st[snap.Name] = readImage(t, img)
		if !oracle {
			continue
		}
		qemutest.Check(t, snap.Path)
		if want := qemutest.ConvertRaw(t, snap.Path); !bytes.Equal(st[snap.Name], want) {
			t.Fatalf("%s@%s reads differently from qemu-img convert of %s", vol, snap.Name, snap.Path)
		}
	}
	img, err := s.OpenHead(ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	st[""] = readImage(t, img)
	if !oracle {
		return st
	}
	head := headPath(t, s, vol)
	qemutest.Check(t, head)
	if want := qemutest.ConvertRaw(t, head); !bytes.Equal(st[""], want) {
		t.Fatalf("head of %s reads differently from qemu-img convert of %s", vol, head)
	}
	return st
}

// sameState fails unless got holds exactly the entries of want, minus
// the names in gone, with equal bytes.
func sameState(t *testing.T, got, want state, gone ...string) {
	t.Helper()
	for name, data := range want {
		if slices.Contains(gone, name) {
			if _, ok := got[name]; ok {
				t.Errorf("snapshot %q still exists", name)
			}
			continue
		}
		g, ok := got[name]
		if !ok {
			t.Errorf("snapshot %q is gone", name)
		} else if !bytes.Equal(g, data) {
			t.Errorf("snapshot %q (\"\" is the head) reads differently than before", name)
		}
	}
	if len(got) != len(want)-len(gone) {
		t.Errorf("have %d snapshots+head, want %d", len(got), len(want)-len(gone))
	}
}

// layerFiles lists the files in the store's layers directory.
func layerFiles(t *testing.T, s *LocalStore) []string {
	t.Helper()
	entries, err := os.ReadDir(s.layers)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// checkNoStrayFiles fails if layers/ holds a file no volume uses.
func checkNoStrayFiles(t *testing.T, s *LocalStore) {
	t.Helper()
	m, err := s.load()
	if err != nil {
		t.Fatal(err)
	}
	used := map[string]bool{}
	for _, v := range m.Volumes {
		used[v.Head] = true
		for _, l := range v.Layers {
			used[l.File] = true
		}
	}
	for _, f := range layerFiles(t, s) {
		if !used[f] {
			t.Errorf("stray file layers/%s", f)
		}
	}
	entries, _ := os.ReadDir(s.dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			t.Errorf("stray temp file %s", e.Name())
		}
	}
}

// buildChain makes volume vol (4 MiB) with snapshots s1..s4, each layer
// writing, overwriting and zeroing parts of the ones below, and writes to
// the head after the last.
func buildChain(t *testing.T, s *LocalStore, vol string) {
	t.Helper()
	mustVolume(t, s, vol, 4<<20)
	writes := [][]string{
		{"write -P 0x11 0 1M", "write -P 0x12 2M 512k"},
		{"write -P 0x21 512k 1M", "write -z 2M 64k", "write -P 0x22 3M 4k"},
		{"write -P 0x31 0 64k", "write -P 0x32 1536k 1M"},
		{"write -z 0 128k", "write -P 0x41 3M 1M"},
	}
	for i, w := range writes {
		writeHead(t, s, vol, w...)
		mustSnapshot(t, s, vol, fmt.Sprintf("s%d", i+1))
	}
	writeHead(t, s, vol, "write -P 0x51 100k 200k", "write -z 3M 64k")
}

func TestCreateSnapshotChain(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	buildChain(t, s, "vm")
	st := capture(t, s, "vm")
	if bytes.Equal(st["s1"], st["s2"]) || bytes.Equal(st["s4"], st[""]) {
		t.Fatal("the snapshots do not differ: the test writes did not land")
	}

	snaps, err := s.ListSnapshots(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	var names, parents []string
	for _, sn := range snaps {
		names, parents = append(names, sn.Name), append(parents, sn.Parent)
		if sn.Consistency != CrashConsistent || sn.Size != 4<<20 || sn.Created.IsZero() {
			t.Errorf("snapshot %+v", sn)
		}
	}
	if !slices.Equal(names, []string{"s1", "s2", "s3", "s4"}) || !slices.Equal(parents, []string{"", "s1", "s2", "s3"}) {
		t.Fatalf("snapshots %v, parents %v", names, parents)
	}

	v, err := s.Volume(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	// The chain, as qemu-img sees it from the head, is the one we report.
	qemuChain := []string{v.HeadPath}
	for _, info := range qemutest.ImgInfoChain(t, v.HeadPath) {
		if info.BackingFilename != "" {
			if strings.Contains(info.BackingFilename, "/") {
				t.Errorf("backing file %q is not a bare name in the store", info.BackingFilename)
			}
			qemuChain = append(qemuChain, filepath.Join(s.layers, info.BackingFilename))
		}
	}
	if !slices.Equal(v.Chain, qemuChain) {
		t.Errorf("Chain %v, qemu-img says %v", v.Chain, qemuChain)
	}
	if v.BytesUsed < 2<<20 {
		t.Errorf("BytesUsed %d, want at least the 2 MiB written", v.BytesUsed)
	}
	// Snapshot layers are read-only files.
	for _, sn := range snaps {
		if fi, err := os.Stat(sn.Path); err != nil || fi.Mode().Perm() != 0o400 {
			t.Errorf("%s: mode %v, %v", sn.Path, fi.Mode(), err)
		}
	}

	// The metadata survives a reopen, and reads the same.
	s2 := reopen(t, s.dir)
	sameState(t, capture(t, s2, "vm"), st)
	checkNoStrayFiles(t, s2)
}

// TestSnapshotIsConstantTime: a snapshot of a big, sparse volume writes a
// few KiB, whatever the size.
func TestSnapshotIsConstantTime(t *testing.T) {
	s := openStore(t)
	mustVolume(t, s, "big", 10<<40)
	writeHead(t, s, "big", "write -P 1 5T 1M")
	before := layerFiles(t, s)
	snap := mustSnapshot(t, s, "big", "s")
	var newHead string
	for _, f := range layerFiles(t, s) {
		if !slices.Contains(before, f) {
			newHead = f
		}
	}
	fi, err := os.Stat(filepath.Join(s.layers, newHead))
	if err != nil {
		t.Fatal(err)
	}
	// An empty 10 TiB qcow2: header, refcounts and an L1 table of 160 KiB.
	if fi.Size() > 1<<20 {
		t.Errorf("new head of a 10 TiB volume is %d bytes", fi.Size())
	}
	img, err := s.OpenSnapshot(context.Background(), "big", snap.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 4096)
	if _, err := img.ReadAt(buf, 5<<40); err != nil || buf[0] != 1 || buf[4095] != 1 {
		t.Fatalf("read at 5 TiB: %v %x", err, buf[:4])
	}
}

func TestDeleteSnapshot(t *testing.T) {
	for _, order := range [][]string{
		{"s2"},             // middle
		{"s1"},             // first: the child becomes the bottom
		{"s4"},             // last: the head is rewritten
		{"s3", "s2", "s4"}, // middle ones then last
		{"s1", "s2", "s3", "s4"},
		{"s4", "s3", "s2", "s1"},
	} {
		t.Run(strings.Join(order, ","), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			s := openStore(t)
			buildChain(t, s, "vm")
			before := capture(t, s, "vm")
			headBefore := headPath(t, s, "vm")
			// An image opened before the deletes keeps reading the same.
			open, err := s.OpenSnapshot(ctx, "vm", "s3")
			if err != nil {
				t.Fatal(err)
			}
			for i, name := range order {
				snap, err := s.Snapshot(ctx, "vm", name)
				if err != nil {
					t.Fatal(err)
				}
				if err := s.DeleteSnapshot(ctx, "vm", name); err != nil {
					t.Fatalf("delete %s: %v", name, err)
				}
				if _, err := os.Stat(snap.Path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("layer of %s still there: %v", name, err)
				}
				sameState(t, capture(t, s, "vm"), before, order[:i+1]...)
				checkNoStrayFiles(t, s)
			}
			if !bytes.Equal(readImage(t, open), before["s3"]) {
				t.Error("an image opened before the deletes reads differently")
			}
			if headPath(t, s, "vm") != headBefore {
				t.Error("the head path changed")
			}
			if _, err := s.Snapshot(ctx, "vm", order[0]); !errors.Is(err, ErrNotFound) {
				t.Errorf("deleted snapshot: %v", err)
			}
			if err := s.DeleteSnapshot(ctx, "vm", order[0]); !errors.Is(err, ErrNotFound) {
				t.Errorf("delete twice: %v", err)
			}
			// Still a working volume: snapshot again, write, read.
			writeHead(t, s, "vm", "write -P 0x61 1M 64k")
			mustSnapshot(t, s, "vm", "again")
			capture(t, s, "vm")
			sameState(t, capture(t, reopen(t, s.dir), "vm"), capture(t, s, "vm"))
		})
	}
}

func TestChanged(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "v", 4<<20)
	writeHead(t, s, "v", "write -P 1 0 1M")
	mustSnapshot(t, s, "v", "a")
	writeHead(t, s, "v", "write -P 2 1M 64k", "write -z 0 64k")
	mustSnapshot(t, s, "v", "b")
	writeHead(t, s, "v", "write -P 3 2M 64k")
	mustSnapshot(t, s, "v", "c")

	want := map[string][]qcow.Extent{
		"a->b": {{Offset: 0, Length: 64 << 10, Kind: qcow.Zero, Layer: 0}, {Offset: 1 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 0}},
		"b->c": {{Offset: 2 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 0}},
		"a->c": {{Offset: 0, Length: 64 << 10, Kind: qcow.Zero, Layer: 1}, {Offset: 1 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 1},
			{Offset: 2 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 0}},
		"->a": {{Offset: 0, Length: 1 << 20, Kind: qcow.Data, Layer: 0}},
	}
	check := func() {
		t.Helper()
		for key, w := range want {
			from, to, _ := strings.Cut(key, "->")
			got, err := s.Changed(ctx, "v", from, to)
			if err != nil {
				t.Fatalf("Changed %s: %v", key, err)
			}
			if !slices.Equal(got, w) {
				t.Errorf("Changed %s = %+v, want %+v", key, got, w)
			}
		}
	}
	check()
	if _, err := s.Changed(ctx, "v", "c", "a"); !errors.Is(err, ErrInvalid) {
		t.Errorf("Changed backwards: %v", err)
	}
	// After b is merged into c, a->c still reports the same ranges.
	if err := s.DeleteSnapshot(ctx, "v", "b"); err != nil {
		t.Fatal(err)
	}
	delete(want, "a->b")
	delete(want, "b->c")
	want["a->c"] = []qcow.Extent{{Offset: 0, Length: 64 << 10, Kind: qcow.Zero, Layer: 0}, {Offset: 1 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 0},
		{Offset: 2 << 20, Length: 64 << 10, Kind: qcow.Data, Layer: 0}}
	check()
}

func TestNames(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	bad := []string{"", "/", "a/b", ".", "..", ".hidden", "tab\there", "nl\n", "del\x7f", "c1\u0085", strings.Repeat("x", 256), "bad\xff"}
	for _, name := range bad {
		if _, err := s.CreateVolume(ctx, name, 1<<20); !errors.Is(err, ErrInvalidName) {
			t.Errorf("volume %q: %v", name, err)
		}
	}
	if _, err := s.CreateVolume(ctx, "a@b", 1<<20); !errors.Is(err, ErrInvalidName) {
		t.Errorf("volume a@b: %v", err)
	}
	long := strings.Repeat("é", 127) // 254 bytes
	mustVolume(t, s, long, 1<<20)
	mustVolume(t, s, "v", 1<<20)
	if _, err := s.CreateVolume(ctx, "v", 1<<20); !errors.Is(err, ErrExists) {
		t.Errorf("existing volume: %v", err)
	}
	for _, name := range append(bad, LatestName) {
		if _, err := s.CreateSnapshots(ctx, []string{"v"}, name, SnapshotOptions{}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("snapshot %q: %v", name, err)
		}
	}
	mustSnapshot(t, s, "v", "snap with spaces & ü")
	// A new snapshot's name leaves room for ".qcow2": since/NAME.qcow2
	// of later snapshots must fit in NAME_MAX.
	if _, err := s.CreateSnapshots(ctx, []string{long}, long, SnapshotOptions{}); !errors.Is(err, ErrInvalidName) {
		t.Errorf("snapshot of %d bytes: %v", len(long), err)
	}
	mustSnapshot(t, s, long, long[:maxNewSnapshotNameLen-1]+"x")
	if _, err := s.CreateSnapshots(ctx, []string{"v"}, "snap with spaces & ü", SnapshotOptions{}); !errors.Is(err, ErrExists) {
		t.Errorf("existing snapshot: %v", err)
	}
	for _, name := range bad {
		if _, err := s.CreateInstance(ctx, name, []Disk{{Device: "vda", Volume: "v"}}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("instance %q: %v", name, err)
		}
	}
	for _, dev := range []string{"", "vd/a", "vd a", "../x", strings.Repeat("v", 33)} {
		if _, err := s.CreateInstance(ctx, "i", []Disk{{Device: dev, Volume: "v"}}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("device %q: %v", dev, err)
		}
	}
	for _, size := range []int64{0, -1, MaxVolumeSize + 1} {
		if _, err := s.CreateVolume(ctx, "sized", size); !errors.Is(err, ErrInvalid) {
			t.Errorf("size %d: %v", size, err)
		}
	}
	if _, err := s.CreateSnapshots(ctx, []string{"missing"}, "x", SnapshotOptions{}); !errors.Is(err, ErrNotFound) {
		t.Errorf("snapshot of a missing volume: %v", err)
	}
	if _, err := s.CreateSnapshots(ctx, []string{"v", "v"}, "x", SnapshotOptions{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("volume twice: %v", err)
	}
	if _, err := s.CreateSnapshots(ctx, []string{"v"}, "x", SnapshotOptions{Consistency: "perfect"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad consistency: %v", err)
	}
	// Nothing of the refusals is left behind.
	checkNoStrayFiles(t, s)
	vols, err := s.ListVolumes(ctx)
	if err != nil || len(vols) != 2 {
		t.Fatalf("volumes %v, %v", vols, err)
	}
}

func TestDeleteVolume(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	buildChain(t, s, "gone")
	mustVolume(t, s, "kept", 1<<20)
	keptHead := headPath(t, s, "kept")
	if err := s.DeleteVolume(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Volume(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted volume: %v", err)
	}
	if err := s.DeleteVolume(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete twice: %v", err)
	}
	if files := layerFiles(t, s); !slices.Equal(files, []string{filepath.Base(keptHead)}) {
		t.Errorf("layers left: %v", files)
	}
	// The name is free again.
	mustVolume(t, s, "gone", 2<<20)
}

func TestClone(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	buildChain(t, s, "base")
	before := capture(t, s, "base")
	c, err := s.CloneVolume(ctx, "clone", SnapshotRef{Volume: "base", Snapshot: "s3"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Parent == nil || *c.Parent != (SnapshotRef{"base", "s3"}) || len(c.Chain) != 4 {
		t.Fatalf("clone %+v", c)
	}
	img, err := s.OpenHead(ctx, "clone")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readImage(t, img), before["s3"]) {
		t.Fatal("the clone does not read as its parent snapshot")
	}
	writeHead(t, s, "clone", "write -P 0x77 0 64k")
	mustSnapshot(t, s, "clone", "c1")
	cloneBefore := capture(t, s, "clone")

	if err := s.DeleteSnapshot(ctx, "base", "s3"); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "clone") {
		t.Errorf("delete of a cloned snapshot: %v", err)
	}
	if err := s.DeleteVolume(ctx, "base"); !errors.Is(err, ErrBusy) {
		t.Errorf("delete of a cloned volume: %v", err)
	}
	// Snapshots below and above the cloned one merge; the clone reads on.
	for _, name := range []string{"s2", "s1", "s4"} {
		if err := s.DeleteSnapshot(ctx, "base", name); err != nil {
			t.Fatalf("delete %s: %v", name, err)
		}
	}
	sameState(t, capture(t, s, "base"), before, "s1", "s2", "s4")
	sameState(t, capture(t, s, "clone"), cloneBefore)
	// The clone's own first snapshot merges onto the parent's layer.
	if err := s.DeleteSnapshot(ctx, "clone", "c1"); err != nil {
		t.Fatal(err)
	}
	sameState(t, capture(t, s, "clone"), cloneBefore, "c1")
	if err := s.DeleteVolume(ctx, "clone"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "base", "s3"); err != nil {
		t.Fatal(err)
	}
	checkNoStrayFiles(t, s)
}

// TestHeadOpenInQemu: while qemu (a VM, here qemu-io) has a head open, a
// snapshot (which would freeze a file qemu keeps writing), a merge into the
// head and a volume delete are refused.
func TestHeadOpenInQemu(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "v", 1<<20)
	mustSnapshot(t, s, "v", "s1")
	stop := holdOpenInQemu(t, headPath(t, s, "v"))
	if _, err := s.CreateSnapshots(ctx, []string{"v"}, "s2", SnapshotOptions{}); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "qemu") {
		t.Errorf("snapshot while qemu has the head: %v", err)
	}
	if err := s.DeleteSnapshot(ctx, "v", "s1"); !errors.Is(err, ErrBusy) {
		t.Errorf("merge into a head qemu has open: %v", err)
	}
	if err := s.DeleteVolume(ctx, "v"); !errors.Is(err, ErrBusy) {
		t.Errorf("delete of a volume qemu has open: %v", err)
	}
	stop()
	mustSnapshot(t, s, "v", "s2")
	if err := s.DeleteSnapshot(ctx, "v", "s1"); err != nil {
		t.Error(err)
	}
	checkNoStrayFiles(t, s)
}

func TestStoreDirMode(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new", "store")
	s := reopen(t, dir)
	fi, err := os.Stat(s.Dir())
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("store dir: %v %v", fi.Mode(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, metaFile)); err != nil {
		t.Fatalf("store.json not written: %v", err)
	}
}

func TestDefaultStoreDir(t *testing.T) {
	for _, c := range []struct {
		euid      int
		xdg, home string
		want      string
	}{
		{0, "/x/data", "/root", "/var/lib/snapfs"},
		{1000, "/x/data", "/home/u", "/x/data/snapfs"},
		{1000, "", "/home/u", "/home/u/.local/share/snapfs"},
		{1000, "relative", "/home/u", "/home/u/.local/share/snapfs"},
		{1000, "", "", ".local/share/snapfs"},
	} {
		if got := storeDirFor(c.euid, c.xdg, c.home); got != c.want {
			t.Errorf("storeDirFor(%d, %q, %q) = %q, want %q", c.euid, c.xdg, c.home, got, c.want)
		}
	}
	home, _ := os.UserHomeDir()
	if got, want := DefaultStoreDir(), storeDirFor(os.Geteuid(), os.Getenv("XDG_DATA_HOME"), home); got != want {
		t.Errorf("DefaultStoreDir() = %q, want %q", got, want)
	}
}

// TestTwoOpens: two LocalStores on one directory (a mount and a CLI
// command) see each other's commits, and a sweep by one does not remove a
// file the other is writing.
func TestTwoOpens(t *testing.T) {
	ctx := context.Background()
	a := openStore(t)
	b := reopen(t, a.dir)
	mustVolume(t, a, "v", 1<<20)
	writeHead(t, a, "v", "write -P 9 0 64k")
	mustSnapshot(t, b, "v", "from-b")
	if _, err := a.Snapshot(ctx, "v", "from-b"); err != nil {
		t.Fatalf("a does not see b's snapshot: %v", err)
	}
	nf, err := a.createFile(newLayerName(), true)
	if err != nil {
		t.Fatal(err)
	}
	c := reopen(t, a.dir) // sweeps
	if _, err := os.Stat(nf.path); err != nil {
		t.Fatalf("the sweep removed a file being written: %v", err)
	}
	nf.discard()
	if err := a.DeleteSnapshot(ctx, "v", "from-b"); err != nil {
		t.Fatal(err)
	}
	if snaps, err := c.ListSnapshots(ctx, "v"); err != nil || len(snaps) != 0 {
		t.Fatalf("c sees %v, %v", snaps, err)
	}
	// An orphan (a layer a crash left unreferenced) goes at the next open.
	orphan := filepath.Join(a.layers, newLayerName())
	if err := os.WriteFile(orphan, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	reopen(t, a.dir)
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan not swept: %v", err)
	}
}

// holdOpenInQemu keeps image open in a qemu-io process (as a VM would)
// until stop is called, or the test ends.
func holdOpenInQemu(t *testing.T, image string) (stop func()) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "qcow2", image)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			stdin.Close() // qemu-io quits at end of input
			cmd.Wait()
		}
	}
	t.Cleanup(stop)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if busy, err := openByQemu(image); err != nil {
			t.Fatal(err)
		} else if busy {
			return stop
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-io did not lock the image within 10 s")
		}
	}
}

// BenchmarkCreateSnapshot measures a snapshot (what mkdir does) of an
// empty 1 GiB and a 100 GiB volume: the cost must not depend on the size.
func BenchmarkCreateSnapshot(b *testing.B) {
	for _, size := range []int64{1 << 30, 100 << 30} {
		b.Run(fmt.Sprintf("%dGiB", size>>30), func(b *testing.B) {
			ctx := context.Background()
			s, err := OpenLocal(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if _, err := s.CreateVolume(ctx, "v", size); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := range b.N {
				if _, err := s.CreateSnapshots(ctx, []string{"v"}, fmt.Sprintf("s%d", i), SnapshotOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestChainDepthLimit: a volume takes snapshots up to the longest chain
// the qcow package opens, then refuses with a message, and stays readable.
func TestChainDepthLimit(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "v", 1<<20)
	writeHead(t, s, "v", "write -P 5 0 4k")
	for i := range qcow.DefaultMaxDepth - 1 {
		mustSnapshot(t, s, "v", fmt.Sprintf("s%d", i))
	}
	_, err := s.CreateSnapshots(ctx, []string{"v"}, "one-more", SnapshotOptions{})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "delete a snapshot") {
		t.Fatalf("snapshot past the depth limit: %v", err)
	}
	img, err := s.OpenHead(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if data := readImage(t, img); data[0] != 5 || data[4096] != 0 {
		t.Fatal("the deepest chain reads wrong")
	}
	// A clone of the newest snapshot is as deep as the volume: it cannot
	// take a snapshot either.
	if _, err := s.CloneVolume(ctx, "c", SnapshotRef{Volume: "v", Snapshot: fmt.Sprintf("s%d", qcow.DefaultMaxDepth-2)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshots(ctx, []string{"c"}, "x", SnapshotOptions{}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("snapshot of a clone past the depth limit: %v", err)
	}
	if err := s.DeleteVolume(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "v", "s7"); err != nil {
		t.Fatal(err)
	}
	mustSnapshot(t, s, "v", "one-more")
}
