// Package backendtest is the conformance suite of snapshot.Backend: one set
// of tests that every backend (the local store, Ceph RBD) runs, so that the
// backends are held to the same contract. Each backend's own tests call
// [Run] with a [Harness] that says how to make a fresh backend, how a VM
// writes into a volume's head, and which independent tool (qemu-img, rbd
// export) reads a snapshot as the oracle.
//
// The suite tests the model only: what any caller of snapshot.Backend may
// rely on. What is particular to one backend (the local store's files,
// crash points; RBD watchers and timeouts) stays in that backend's tests.
package backendtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
	"snapfs/snapshot"
)

// Harness adapts one backend to the suite.
type Harness struct {
	// New returns a fresh backend for one subtest, torn down by the
	// subtest's cleanups. Backends that share a store between subtests
	// (one RBD pool) are fine: the suite names every volume uniquely.
	New func(t *testing.T) snapshot.Backend
	// Write writes data at off into the head of volume, as a VM would
	// (qemu-io on the local store's head file, librbd for RBD), and
	// flushes.
	Write func(t *testing.T, b snapshot.Backend, volume string, off int64, data []byte)
	// Reference returns what an independent tool reads for snapshot snap
	// of volume ("" for the head): qemu-img convert of the layer file,
	// rbd export of the image.
	Reference func(t *testing.T, b snapshot.Backend, volume, snap string) []byte
	// ChangedReference, if set, returns the byte ranges the backend's own
	// tool says changed from snapshot from to snapshot to (rbd
	// export-diff --from-snap): Changed must cover them.
	ChangedReference func(t *testing.T, b snapshot.Backend, volume, from, to string) []qcow.Extent
	// CreateInstance, for backends that are also instance providers,
	// defines instance name over disks (the local store's instance
	// groups); nil for backends without instances.
	CreateInstance func(t *testing.T, b snapshot.Backend, name string, disks []snapshot.Disk)
	// Granularity is the unit in which the backend may over-report
	// Changed (RBD: its object size); 0 means Changed is exact to the
	// byte range written, rounded to 64 KiB clusters.
	Granularity int64
}

// size is the virtual size of the suite's volumes: a few objects of RBD,
// a few clusters of qcow2, small enough to compare in memory.
const size = 16 << 20

// Run runs the whole suite against the backend h makes.
func Run(t *testing.T, h Harness) {
	tests := []struct {
		name string
		fn   func(*testing.T, *suite)
	}{
		{"Volumes", testVolumes},
		{"Names", testNames},
		{"SnapshotsImmutable", testSnapshotsImmutable},
		{"DeleteMiddleSnapshot", testDeleteMiddle},
		{"Changed", testChanged},
		{"Clone", testClone},
		{"Revert", testRevert},
		{"Import", testImport},
		{"ImportHostile", testImportHostile},
		{"Exports", testExports},
		{"Instances", testInstances},
		{"Hold", testHold},
		{"OpenOutlivesDelete", testOpenOutlivesDelete},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			t.Cleanup(cancel)
			var b [4]byte
			rand.Read(b[:])
			s := &suite{h: h, b: h.New(t), ctx: c, id: hex.EncodeToString(b[:])}
			tc.fn(t, s)
		})
	}
}

// suite is the state of one subtest.
type suite struct {
	h   Harness
	b   snapshot.Backend
	ctx context.Context
	id  string // makes the subtest's volume names unique
}

// name returns a volume name unique to this subtest.
func (s *suite) name(base string) string { return "conf-" + base + "-" + s.id }

func (s *suite) volume(t *testing.T, base string) string {
	t.Helper()
	name := s.name(base)
	v, err := s.b.CreateVolume(s.ctx, name, size)
	if err != nil {
		t.Fatalf("CreateVolume(%s): %v", name, err)
	}
	if v.Name != name || v.Size != size || v.Parent != nil {
		t.Fatalf("CreateVolume(%s) = %+v", name, v)
	}
	return name
}

func (s *suite) snapshot(t *testing.T, vol, name string) snapshot.Snapshot {
	t.Helper()
	snaps, err := s.b.CreateSnapshots(s.ctx, []string{vol}, name, snapshot.SnapshotOptions{})
	if err != nil {
		t.Fatalf("snapshot %s@%s: %v", vol, name, err)
	}
	if len(snaps) != 1 || snaps[0].Volume != vol || snaps[0].Name != name {
		t.Fatalf("snapshot %s@%s = %+v", vol, name, snaps)
	}
	return snaps[0]
}

// write writes n bytes of fill at off into vol's head, and into model.
func (s *suite) write(t *testing.T, model []byte, vol string, off int64, n int, fill byte) {
	t.Helper()
	data := bytes.Repeat([]byte{fill}, n)
	s.h.Write(t, s.b, vol, off, data)
	copy(model[off:], data)
}

// read reads snapshot snap of vol ("" for the head) through the backend.
func (s *suite) read(t *testing.T, vol, snap string) []byte {
	t.Helper()
	var img qcow.Image
	var err error
	if snap == "" {
		img, err = s.b.OpenHead(s.ctx, vol)
	} else {
		img, err = s.b.OpenSnapshot(s.ctx, vol, snap)
	}
	if err != nil {
		t.Fatalf("open %s@%s: %v", vol, snap, err)
	}
	return readImage(t, img)
}

// check asserts that snapshot snap of vol reads want through the backend
// and through the harness's reference tool.
func (s *suite) check(t *testing.T, vol, snap string, want []byte) {
	t.Helper()
	if got := s.read(t, vol, snap); !bytes.Equal(got, want) {
		t.Errorf("%s@%s reads %s through the backend; want %s", vol, snap, firstDiff(got, want), "the model")
	}
	if got := s.h.Reference(t, s.b, vol, snap); !bytes.Equal(got, want) {
		t.Errorf("%s@%s reads %s through the reference tool", vol, snap, firstDiff(got, want))
	}
}

// readImage reads a whole image in odd-sized pieces, so that reads cross
// cluster and object boundaries, and closes it.
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

// firstDiff describes where a and b first differ.
func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return "a different size (" + itoa(int64(len(a))) + " bytes, want " + itoa(int64(len(b))) + ")"
	}
	for i := range a {
		if a[i] != b[i] {
			return "a different byte at offset " + itoa(int64(i))
		}
	}
	return "the same bytes"
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func volumeNames(t *testing.T, s *suite) []string {
	t.Helper()
	vols, err := s.b.ListVolumes(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range vols {
		names = append(names, v.Name)
	}
	return names
}

func snapshotNames(t *testing.T, s *suite, vol string) []string {
	t.Helper()
	snaps, err := s.b.ListSnapshots(s.ctx, vol)
	if err != nil {
		t.Fatalf("ListSnapshots(%s): %v", vol, err)
	}
	var names []string
	for _, sn := range snaps {
		names = append(names, sn.Name)
	}
	return names
}

// testVolumes: create, list, describe and delete volumes; EEXIST and
// ENOENT as sentinels.
func testVolumes(t *testing.T, s *suite) {
	a := s.volume(t, "a")
	bv := s.volume(t, "b")
	if names := volumeNames(t, s); !slices.Contains(names, a) || !slices.Contains(names, bv) {
		t.Errorf("ListVolumes = %v; want %s and %s in it", names, a, bv)
	}
	if v, err := s.b.Volume(s.ctx, a); err != nil || v.Name != a || v.Size != size {
		t.Errorf("Volume(%s) = %+v, %v", a, v, err)
	}
	// A new volume reads zeros.
	s.check(t, a, "", make([]byte, size))
	if _, err := s.b.CreateVolume(s.ctx, a, size); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("CreateVolume of an existing volume: %v; want ErrExists", err)
	}
	if _, err := s.b.Volume(s.ctx, s.name("missing")); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Volume of a missing volume: %v; want ErrNotFound", err)
	}
	if _, err := s.b.ListSnapshots(s.ctx, s.name("missing")); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("ListSnapshots of a missing volume: %v; want ErrNotFound", err)
	}
	if err := s.b.DeleteVolume(s.ctx, s.name("missing")); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("DeleteVolume of a missing volume: %v; want ErrNotFound", err)
	}
	// A volume with snapshots is deleted with them.
	s.snapshot(t, a, "s1")
	if err := s.b.DeleteVolume(s.ctx, a); err != nil {
		t.Fatalf("DeleteVolume(%s): %v", a, err)
	}
	if names := volumeNames(t, s); slices.Contains(names, a) || !slices.Contains(names, bv) {
		t.Errorf("after deleting %s, ListVolumes = %v", a, names)
	}
	if _, err := s.b.OpenSnapshot(s.ctx, a, "s1"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("OpenSnapshot of a deleted volume: %v; want ErrNotFound", err)
	}
	// The name is free again.
	s.volume(t, "a")
}

// testNames: invalid volume and snapshot names are refused with
// ErrInvalidName and create nothing; a taken snapshot name is ErrExists.
func testNames(t *testing.T, s *suite) {
	vol := s.volume(t, "n")
	for _, bad := range []string{"", ".hidden", "a/b", "x@y", "ctl\x01", string([]byte{0xff})} {
		if _, err := s.b.CreateVolume(s.ctx, bad, size); !errors.Is(err, snapshot.ErrInvalidName) {
			t.Errorf("CreateVolume(%q): %v; want ErrInvalidName", bad, err)
		}
	}
	for _, bad := range []string{"", ".hidden", "a/b", "latest", "ctl\x01", string([]byte{0xff})} {
		if _, err := s.b.CreateSnapshots(s.ctx, []string{vol}, bad, snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrInvalidName) {
			t.Errorf("CreateSnapshots(%q): %v; want ErrInvalidName", bad, err)
		}
	}
	for _, n := range []int64{0, -1} {
		if _, err := s.b.CreateVolume(s.ctx, s.name("sized"), n); !errors.Is(err, snapshot.ErrInvalid) {
			t.Errorf("CreateVolume of size %d: %v; want ErrInvalid", n, err)
		}
	}
	if _, err := s.b.CreateSnapshots(s.ctx, []string{vol, vol}, "twice", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("CreateSnapshots of one volume twice: %v; want ErrInvalid", err)
	}
	if _, err := s.b.CreateSnapshots(s.ctx, []string{vol}, "x", snapshot.SnapshotOptions{Consistency: "perfect"}); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("CreateSnapshots with an unknown consistency: %v; want ErrInvalid", err)
	}
	if names := snapshotNames(t, s, vol); len(names) != 0 {
		t.Errorf("refused names left snapshots %v", names)
	}
	if _, err := s.b.Volume(s.ctx, s.name("sized")); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("a refused size left a volume: %v", err)
	}
	// Names are UTF-8 with spaces and punctuation.
	odd := "snap with spaces & ü"
	s.snapshot(t, vol, odd)
	if names := snapshotNames(t, s, vol); !slices.Equal(names, []string{odd}) {
		t.Errorf("snapshots %v", names)
	}
	if err := s.b.DeleteSnapshot(s.ctx, vol, odd); err != nil {
		t.Fatal(err)
	}
	s.snapshot(t, vol, "s1")
	if _, err := s.b.CreateSnapshots(s.ctx, []string{vol}, "s1", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("CreateSnapshots of a taken name: %v; want ErrExists", err)
	}
	if _, err := s.b.CreateSnapshots(s.ctx, []string{s.name("missing")}, "s2", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("CreateSnapshots of a missing volume: %v; want ErrNotFound", err)
	}
	if _, err := s.b.Snapshot(s.ctx, vol, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Snapshot of a missing snapshot: %v; want ErrNotFound", err)
	}
	if err := s.b.DeleteSnapshot(s.ctx, vol, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("DeleteSnapshot of a missing snapshot: %v; want ErrNotFound", err)
	}
	if names := snapshotNames(t, s, vol); !slices.Equal(names, []string{"s1"}) {
		t.Errorf("snapshots %v; want [s1]", names)
	}
}

// testSnapshotsImmutable: a snapshot keeps reading what the head held when
// it was taken, while the head is written on; snapshots list oldest first,
// each naming its predecessor; several volumes snapshot under one name.
func testSnapshotsImmutable(t *testing.T, s *suite) {
	vol := s.volume(t, "imm")
	model := make([]byte, size)
	var states [][]byte
	for i, name := range []string{"s1", "s2", "s3"} {
		s.write(t, model, vol, int64(i)*3<<20+12345, 2<<20, byte('a'+i))
		s.write(t, model, vol, 0, 4096, byte('A'+i))
		sn := s.snapshot(t, vol, name)
		if sn.Size != size {
			t.Errorf("%s: size %d", name, sn.Size)
		}
		states = append(states, slices.Clone(model))
	}
	s.write(t, model, vol, 1<<20, 5<<20, 'h')
	snaps, err := s.b.ListSnapshots(s.ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 || snaps[0].Name != "s1" || snaps[1].Name != "s2" || snaps[2].Name != "s3" ||
		snaps[0].Parent != "" || snaps[1].Parent != "s1" || snaps[2].Parent != "s2" {
		t.Errorf("ListSnapshots = %+v", snaps)
	}
	for i, name := range []string{"s1", "s2", "s3"} {
		s.check(t, vol, name, states[i])
	}
	s.check(t, vol, "", model)

	// One snapshot name over several volumes.
	other := s.volume(t, "imm2")
	snaps, err = s.b.CreateSnapshots(s.ctx, []string{vol, other}, "both", snapshot.SnapshotOptions{Metadata: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 2 || snaps[0].Volume != vol || snaps[1].Volume != other {
		t.Fatalf("CreateSnapshots of two volumes = %+v", snaps)
	}
	if sn, err := s.b.Snapshot(s.ctx, other, "both"); err != nil || sn.Metadata["k"] != "v" {
		t.Errorf("Snapshot(%s@both) = %+v, %v; want metadata k=v", other, sn, err)
	}
	s.check(t, vol, "both", model)
	s.check(t, other, "both", make([]byte, size))
}

// testDeleteMiddle: deleting a snapshot in the middle of a chain keeps the
// bytes of every other snapshot and of the head.
func testDeleteMiddle(t *testing.T, s *suite) {
	vol := s.volume(t, "mid")
	model := make([]byte, size)
	states := map[string][]byte{}
	names := []string{"s1", "s2", "s3", "s4"}
	for i, name := range names {
		// Overlapping writes: each snapshot holds data the next
		// overwrites in part, and zeros over earlier data.
		s.write(t, model, vol, int64(i)<<20+777, 3<<20, byte('1'+i))
		if i > 0 {
			s.write(t, model, vol, int64(i-1)<<20, 64<<10, 0)
		}
		s.snapshot(t, vol, name)
		states[name] = slices.Clone(model)
	}
	s.write(t, model, vol, 10<<20, 1<<20, 'h')
	for _, del := range []string{"s2", "s3", "s1"} {
		if err := s.b.DeleteSnapshot(s.ctx, vol, del); err != nil {
			t.Fatalf("DeleteSnapshot(%s): %v", del, err)
		}
		delete(states, del)
		for name, want := range states {
			s.check(t, vol, name, want)
		}
		s.check(t, vol, "", model)
	}
	if names := snapshotNames(t, s, vol); !slices.Equal(names, []string{"s4"}) {
		t.Errorf("snapshots %v; want [s4]", names)
	}
	if sn, err := s.b.Snapshot(s.ctx, vol, "s4"); err != nil || sn.Parent != "" {
		t.Errorf("s4 after its predecessors went: %+v, %v; want no parent", sn, err)
	}
}

// testChanged: Changed between two snapshots covers every byte that
// differs, reports nothing outside what was written (at the backend's
// granularity), and reads as Data or Zero as the later snapshot does.
func testChanged(t *testing.T, s *suite) {
	vol := s.volume(t, "chg")
	model := make([]byte, size)
	s.write(t, model, vol, 0, 8<<20, 'a')
	s.snapshot(t, vol, "s1")
	s1 := slices.Clone(model)
	written := []qcow.Extent{
		{Offset: 1 << 20, Length: 100_000},
		{Offset: 5<<20 + 4096, Length: 1 << 20},
		{Offset: 12 << 20, Length: 65536},
	}
	s.write(t, model, vol, written[0].Offset, int(written[0].Length), 'b')
	s.write(t, model, vol, written[1].Offset, int(written[1].Length), 0) // data became zero
	s.write(t, model, vol, written[2].Offset, int(written[2].Length), 'c')
	s.snapshot(t, vol, "s2")
	s2 := slices.Clone(model)
	s.write(t, model, vol, 14<<20, 4096, 'd') // the head, after s2: not in the diff
	s.snapshot(t, vol, "s3")

	changed, err := s.b.Changed(s.ctx, vol, "s1", "s2")
	if err != nil {
		t.Fatal(err)
	}
	covered := make([]bool, size)
	for _, e := range changed {
		if e.Offset < 0 || e.End() > size || e.Length <= 0 {
			t.Fatalf("extent %+v out of the volume", e)
		}
		for i := e.Offset; i < e.End(); i++ {
			covered[i] = true
		}
		// Zero extents read zeros in s2.
		if e.Kind == qcow.Zero && !allZero(s2[e.Offset:e.End()]) {
			t.Errorf("extent %+v reported Zero but s2 holds data there", e)
		}
		// Nothing outside the writes, rounded out to the granularity.
		g := s.h.Granularity
		if g == 0 {
			g = 64 << 10
		}
		inside := false
		for _, w := range written {
			if e.Offset >= w.Offset/g*g && e.End() <= (w.End()+g-1)/g*g {
				inside = true
			}
		}
		if !inside {
			t.Errorf("extent %+v is outside every write %v (granularity %d)", e, written, g)
		}
	}
	for i := range s1 {
		if s1[i] != s2[i] && !covered[i] {
			t.Fatalf("byte %d differs between s1 and s2 but Changed %v does not cover it", i, changed)
		}
	}
	if s.h.Granularity == 0 {
		// An exact backend reports exactly the clusters written.
		for _, w := range written {
			for i := w.Offset / (64 << 10) * (64 << 10); i < w.End(); i++ {
				if !covered[i] {
					t.Fatalf("Changed %v misses byte %d, written in %+v", changed, i, w)
				}
			}
		}
	}
	if s.h.ChangedReference != nil {
		for _, r := range s.h.ChangedReference(t, s.b, vol, "s1", "s2") {
			for i := r.Offset; i < r.End(); i++ {
				if !covered[i] {
					t.Fatalf("the reference tool reports %+v changed; Changed %v misses byte %d", r, changed, i)
				}
			}
		}
	}
	// from "" is every extent of to that holds something; refined, it is
	// exactly where s1 holds data.
	all, err := s.b.Changed(s.ctx, vol, "", "s1")
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < size; i += 4096 {
		in := slices.ContainsFunc(all, func(e qcow.Extent) bool { return e.Offset <= i && i < e.End() })
		if s1[i] != 0 && !in {
			t.Fatalf("Changed(\"\", s1) = %v misses offset %d, which holds data", all, i)
		}
	}
	if _, err := s.b.Changed(s.ctx, vol, "s1", "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Changed to a missing snapshot: %v; want ErrNotFound", err)
	}
	if _, err := s.b.Changed(s.ctx, vol, "s2", "s1"); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("Changed backwards: %v; want ErrInvalid", err)
	}
	// Once s2 is deleted, s1 to s3 still covers what s1 to s2 did.
	before, err := s.b.Changed(s.ctx, vol, "s1", "s3")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.b.DeleteSnapshot(s.ctx, vol, "s2"); err != nil {
		t.Fatal(err)
	}
	after, err := s.b.Changed(s.ctx, vol, "s1", "s3")
	if err != nil {
		t.Fatal(err)
	}
	if cover(after) != cover(before) || cover(after) < cover(changed) {
		t.Errorf("Changed s1 to s3 covers %d bytes after s2 went, %d before (s1 to s2: %d)", cover(after), cover(before), cover(changed))
	}
}

// cover returns how many bytes extents cover.
func cover(extents []qcow.Extent) int64 {
	var n int64
	for _, e := range extents {
		n += e.Length
	}
	return n
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// testClone: clones are made in O(1) (no data copied: they read through
// the parent snapshot), diverge from it when written, hold the parent
// snapshot (ErrBusy on delete), and flatten into standalone volumes that
// read the same. Backends without clones say ErrUnsupported through Manager.
func testClone(t *testing.T, s *suite) {
	m := snapshot.NewManager(s.b, nil)
	cl, ok := s.b.(snapshot.Cloner)
	vol := s.volume(t, "par")
	model := make([]byte, size)
	s.write(t, model, vol, 2<<20+100, 6<<20, 'p')
	s.snapshot(t, vol, "base")
	base := slices.Clone(model)
	s.write(t, model, vol, 0, 1<<20, 'q') // the parent's head moves on
	name := s.name("clone")
	if !ok {
		if _, err := m.Clone(s.ctx, vol, "base", name); !errors.Is(err, snapshot.ErrUnsupported) {
			t.Errorf("Manager.Clone on a backend without clones: %v; want ErrUnsupported", err)
		}
		return
	}
	if _, err := cl.Clone(s.ctx, vol, "nope", name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Clone of a missing snapshot: %v; want ErrNotFound", err)
	}
	if _, err := cl.Clone(s.ctx, vol, "base", vol); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("Clone onto an existing volume: %v; want ErrExists", err)
	}
	if _, err := cl.Clone(s.ctx, vol, "base", "bad/name"); !errors.Is(err, snapshot.ErrInvalidName) {
		t.Errorf("Clone to an invalid name: %v; want ErrInvalidName", err)
	}
	v, err := m.Clone(s.ctx, vol, "base", name)
	if err != nil {
		t.Fatal(err)
	}
	if v.Parent == nil || v.Parent.Snapshot != "base" || v.Size != size {
		t.Fatalf("clone = %+v; want parent @base", v)
	}
	// O(1): the clone holds no data of its own.
	if v.BytesUsed > 1<<20 {
		t.Errorf("a fresh clone uses %d bytes; want no copy of the parent", v.BytesUsed)
	}
	if sn, err := s.b.Snapshot(s.ctx, vol, "base"); err != nil || !slices.Equal(sn.Clones, []string{name}) {
		t.Errorf("base = %+v, %v; want clones [%s]", sn, err, name)
	}
	cloneModel := slices.Clone(base)
	s.check(t, name, "", cloneModel)
	s.write(t, cloneModel, name, 3<<20, 1<<20, 'c')
	s.snapshot(t, name, "c1")
	s.check(t, name, "c1", cloneModel)
	// A clone reverts to its own snapshot, reading through its parent.
	if _, ok := s.b.(snapshot.Reverter); ok {
		scratch := slices.Clone(cloneModel)
		s.write(t, scratch, name, 0, 5<<20, 'd')
		if err := m.Revert(s.ctx, name, "c1"); err != nil {
			t.Fatalf("Revert of the clone: %v", err)
		}
		s.check(t, name, "", cloneModel)
	}
	s.check(t, vol, "base", base) // the parent is untouched
	s.check(t, vol, "", model)
	if err := m.DeleteSnapshot(s.ctx, vol, "base"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("DeleteSnapshot of a cloned snapshot: %v; want ErrBusy", err)
	}
	if err := s.b.DeleteVolume(s.ctx, vol); err == nil {
		t.Errorf("DeleteVolume of a volume whose snapshot has clones succeeded")
	}
	// Flatten: the same bytes, no parent, and the parent snapshot free.
	if err := m.Flatten(s.ctx, name); err != nil {
		t.Fatal(err)
	}
	if v, err := s.b.Volume(s.ctx, name); err != nil || v.Parent != nil {
		t.Errorf("after Flatten: %+v, %v; want no parent", v, err)
	}
	s.check(t, name, "", cloneModel)
	s.check(t, name, "c1", cloneModel)
	if err := m.Flatten(s.ctx, name); err != nil {
		t.Errorf("Flatten of a volume without a parent: %v; want nothing done", err)
	}
	if err := m.DeleteSnapshot(s.ctx, vol, "base"); err != nil {
		t.Fatalf("DeleteSnapshot of base after Flatten: %v", err)
	}
	s.check(t, name, "", cloneModel)
}

// testRevert: the head reads as the snapshot again, every snapshot is
// kept, and later writes do not reach the snapshot.
func testRevert(t *testing.T, s *suite) {
	m := snapshot.NewManager(s.b, nil)
	vol := s.volume(t, "rev")
	model := make([]byte, size)
	s.write(t, model, vol, 1<<20, 2<<20, 'a')
	s.snapshot(t, vol, "s1")
	s1 := slices.Clone(model)
	s.write(t, model, vol, 2<<20, 4<<20, 'b')
	s.snapshot(t, vol, "s2")
	s2 := slices.Clone(model)
	s.write(t, model, vol, 0, 9<<20, 'h')
	if _, ok := s.b.(snapshot.Reverter); !ok {
		if err := m.Revert(s.ctx, vol, "s1"); !errors.Is(err, snapshot.ErrUnsupported) {
			t.Errorf("Manager.Revert on a backend without it: %v; want ErrUnsupported", err)
		}
		return
	}
	if err := m.Revert(s.ctx, vol, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Revert to a missing snapshot: %v; want ErrNotFound", err)
	}
	if err := m.Revert(s.ctx, vol, "s1"); err != nil {
		t.Fatal(err)
	}
	s.check(t, vol, "", s1)
	s.check(t, vol, "s1", s1)
	s.check(t, vol, "s2", s2)
	if names := snapshotNames(t, s, vol); !slices.Equal(names, []string{"s1", "s2"}) {
		t.Errorf("snapshots after Revert: %v", names)
	}
	head := slices.Clone(s1)
	s.write(t, head, vol, 1<<20, 4096, 'z')
	s.check(t, vol, "", head)
	s.check(t, vol, "s1", s1)
}

// testImport: raw and qcow2 files import as volumes that read as
// qemu-img reads the file; metadata is kept; a taken name is ErrExists.
func testImport(t *testing.T, s *suite) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "in.raw")
	want := make([]byte, 3<<20+512) // not a multiple of any object size
	rand.Read(want[1<<20 : 2<<20])
	copy(want[3<<20:], "tail")
	if err := os.WriteFile(raw, want, 0o600); err != nil {
		t.Fatal(err)
	}
	qc := filepath.Join(dir, "in.qcow2")
	qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", raw, qc)
	for _, in := range []string{raw, qc} {
		name := s.name(filepath.Ext(in)[1:])
		img, err := snapshot.OpenUntrusted(in)
		if err != nil {
			t.Fatalf("OpenUntrusted(%s): %v", in, err)
		}
		v, err := s.b.ImportVolume(s.ctx, name, img, map[string]string{"source": in})
		img.Close()
		if err != nil {
			t.Fatalf("ImportVolume(%s): %v", in, err)
		}
		if v.Size < int64(len(want)) || v.Metadata["source"] != in {
			t.Errorf("imported %+v", v)
		}
		ref := qemutest.ConvertRaw(t, in)
		ref = append(ref, make([]byte, v.Size-int64(len(ref)))...)
		s.check(t, name, "", ref)
		img, err = snapshot.OpenUntrusted(in)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.b.ImportVolume(s.ctx, name, img, nil); !errors.Is(err, snapshot.ErrExists) {
			t.Errorf("ImportVolume onto an existing volume: %v; want ErrExists", err)
		}
		img.Close()
	}
}

// failingImage is an import source that fails after some bytes, as a
// truncated or unreadable file would.
type failingImage struct{ size int64 }

func (f failingImage) Size() int64  { return f.size }
func (f failingImage) Close() error { return nil }
func (f failingImage) Extents(off, length int64) ([]qcow.Extent, error) {
	return []qcow.Extent{{Offset: off, Length: length, Kind: qcow.Data}}, nil
}
func (f failingImage) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > 1<<20 {
		return 0, errors.New("injected read error")
	}
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

// testImportHostile: hostile qcow2 files are refused before the backend
// sees them (ErrInvalid), and an import that fails half-way leaves no
// volume behind.
func testImportHostile(t *testing.T, s *suite) {
	dir := t.TempDir()
	backing := filepath.Join(dir, "backed.qcow2")
	qemutest.Img(t, "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", backing, "1M")
	truncated := filepath.Join(dir, "trunc.qcow2")
	qemutest.Img(t, "create", "-f", "qcow2", truncated, "1M")
	b, err := os.ReadFile(truncated)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(truncated, b[:100], 0o600)
	for _, in := range []string{backing, truncated} {
		if img, err := snapshot.OpenUntrusted(in); !errors.Is(err, snapshot.ErrInvalid) {
			if img != nil {
				img.Close()
			}
			t.Errorf("OpenUntrusted(%s): %v; want ErrInvalid", filepath.Base(in), err)
		}
	}
	before := volumeNames(t, s)
	name := s.name("fail")
	if _, err := s.b.ImportVolume(s.ctx, name, failingImage{size: 4 << 20}, nil); err == nil {
		t.Fatal("an import whose source fails succeeded")
	}
	if _, err := s.b.Volume(s.ctx, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after a failed import, Volume(%s): %v; want ErrNotFound", name, err)
	}
	if after := volumeNames(t, s); !slices.Equal(after, before) {
		t.Errorf("a failed import changed the volumes: %v -> %v", before, after)
	}
	if _, err := s.b.ImportVolume(s.ctx, "bad/name", failingImage{size: 1 << 20}, nil); !errors.Is(err, snapshot.ErrInvalidName) {
		t.Errorf("ImportVolume to an invalid name: %v; want ErrInvalidName", err)
	}
}

// writeExport writes the bytes of an export to path and closes it.
func writeExport(t *testing.T, x *snapshot.Export, err error, path string) {
	t.Helper()
	if err != nil {
		t.Fatalf("export for %s: %v", path, err)
	}
	defer x.Close()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, io.NewSectionReader(x, 0, x.Size())); err != nil {
		t.Fatalf("reading the export for %s: %v", path, err)
	}
}

// testExports: FullExport of each snapshot is a qcow2 that qemu-img checks
// and reads as the snapshot; IncrementalExport of S2 since S1, laid out as
// the mount serves it (S2/since/S1.qcow2 backed by S1/disk.qcow2), reads
// as S2 through qemu-img, and holds data only where Changed says.
func testExports(t *testing.T, s *suite) {
	vol := s.volume(t, "exp")
	model := make([]byte, size)
	s.write(t, model, vol, 0, 6<<20, 'a')
	s.snapshot(t, vol, "S1")
	s.write(t, model, vol, 1<<20, 200_000, 'b')
	s.write(t, model, vol, 4<<20, 1<<20, 0)
	s.write(t, model, vol, 15<<20, 4096, 'c')
	s.snapshot(t, vol, "S2")
	dir := t.TempDir()
	for _, snap := range []string{"S1", "S2"} {
		x, err := snapshot.FullExport(s.ctx, s.b, vol, snap)
		writeExport(t, x, err, filepath.Join(dir, snap, "disk.qcow2"))
	}
	x, err := snapshot.IncrementalExport(s.ctx, s.b, vol, "S1", "S2")
	since := filepath.Join(dir, "S2", "since", "S1.qcow2")
	writeExport(t, x, err, since)
	for _, f := range []string{filepath.Join(dir, "S1", "disk.qcow2"), filepath.Join(dir, "S2", "disk.qcow2"), since} {
		qemutest.Check(t, f)
	}
	for snap, f := range map[string]string{"S1": filepath.Join(dir, "S1", "disk.qcow2"), "S2": since} {
		want := s.h.Reference(t, s.b, vol, snap)
		if got := qemutest.ConvertRaw(t, f); !bytes.Equal(got, want) {
			t.Errorf("qemu-img convert of %s reads %s; want %s@%s", f, firstDiff(got, want), vol, snap)
		}
	}
	qemutest.Compare(t, filepath.Join(dir, "S2", "disk.qcow2"), since)
	// The overlay holds only what changed, and at least what the
	// reference tool says changed.
	changed, err := s.b.Changed(s.ctx, vol, "S1", "S2")
	if err != nil {
		t.Fatal(err)
	}
	var reported int64
	for _, e := range changed {
		reported += e.Length
	}
	var allocated int64
	for _, e := range qemutest.Map(t, since) {
		if e.Depth == 0 && e.Present {
			allocated += e.Length
			if !slices.ContainsFunc(changed, func(c qcow.Extent) bool {
				return c.Offset <= e.Start && e.End() <= c.End()
			}) {
				// A cluster may straddle two changed extents; the
				// qemu-img comparison above proves its bytes.
				g := int64(snapshot.ExportClusterSize)
				if !slices.ContainsFunc(changed, func(c qcow.Extent) bool {
					return c.Offset/g*g <= e.Start && e.End() <= (c.End()+g-1)/g*g
				}) {
					t.Errorf("the overlay holds %+v, outside every changed extent %v", e, changed)
				}
			}
		}
	}
	if allocated == 0 || allocated >= size/2 {
		t.Errorf("the overlay allocates %d bytes of %d; want about the change (%d reported)", allocated, size, reported)
	}
	if s.h.ChangedReference != nil {
		m := qemutest.Map(t, since)
		for _, r := range s.h.ChangedReference(t, s.b, vol, "S1", "S2") {
			for off := r.Offset; off < r.End(); off += 4096 {
				if !slices.ContainsFunc(m, func(e qemutest.MapEntry) bool {
					return e.Depth == 0 && e.Present && e.Start <= off && off < e.End()
				}) {
					t.Fatalf("the reference tool reports %+v changed; the overlay does not hold offset %d", r, off)
				}
			}
		}
	}
	if _, err := snapshot.IncrementalExport(s.ctx, s.b, vol, "S2", "S2"); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("IncrementalExport of a snapshot since itself: %v; want ErrInvalid", err)
	}
}

// testInstances: a backend that is also an instance provider snapshots
// every disk of an instance under one name, reads each disk snapshot as
// its volume read, and deletes them with the instance snapshot. Without a
// provider, Manager says ErrNotFound and creates nothing.
func testInstances(t *testing.T, s *suite) {
	vda, vdb := s.volume(t, "vda"), s.volume(t, "vdb")
	p, ok := s.b.(snapshot.InstanceProvider)
	if !ok || s.h.CreateInstance == nil {
		m := snapshot.NewManager(s.b, nil)
		if _, err := m.SnapshotInstance(s.ctx, "vm", "s1", nil); !errors.Is(err, snapshot.ErrNotFound) {
			t.Errorf("SnapshotInstance without a provider: %v; want ErrNotFound", err)
		}
		if names := snapshotNames(t, s, vda); len(names) != 0 {
			t.Errorf("a refused instance snapshot left %v", names)
		}
		return
	}
	m := snapshot.NewManager(s.b, p)
	if _, err := m.SnapshotInstance(s.ctx, s.name("novm"), "s1", nil); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("SnapshotInstance of a missing instance: %v; want ErrNotFound", err)
	}
	vm := s.name("vm")
	s.h.CreateInstance(t, s.b, vm, []snapshot.Disk{{Device: "vda", Volume: vda}, {Device: "vdb", Volume: vdb}})
	a, b := make([]byte, size), make([]byte, size)
	s.write(t, a, vda, 0, 1<<20, 'a')
	s.write(t, b, vdb, 2<<20, 1<<20, 'b')
	is, err := m.SnapshotInstance(s.ctx, vm, "i1", map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	if is.Instance != vm || is.Name != "i1" || len(is.Disks) != 2 || is.Metadata["k"] != "v" || is.Consistency == "" {
		t.Fatalf("instance snapshot %+v", is)
	}
	wantA, wantB := slices.Clone(a), slices.Clone(b)
	s.write(t, a, vda, 0, 1<<20, 'z')
	for _, d := range is.Disks {
		want := map[string][]byte{vda: wantA, vdb: wantB}[d.Volume]
		if want == nil {
			t.Fatalf("disk %+v of no volume of the instance", d)
		}
		s.check(t, d.Volume, d.Snapshot, want)
		if sn, err := s.b.Snapshot(s.ctx, d.Volume, d.Snapshot); err != nil || sn.Instance != vm {
			t.Errorf("disk snapshot %+v, %v; want it to name instance %s", sn, err, vm)
		}
	}
	if _, err := m.SnapshotInstance(s.ctx, vm, "i1", nil); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("SnapshotInstance of a taken name: %v; want ErrExists", err)
	}
	if list, err := p.ListInstanceSnapshots(s.ctx, vm); err != nil || len(list) != 1 || list[0].Name != "i1" {
		t.Errorf("ListInstanceSnapshots = %+v, %v", list, err)
	}
	if err := m.DeleteInstanceSnapshot(s.ctx, vm, "i1"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{vda, vdb} {
		if names := snapshotNames(t, s, v); len(names) != 0 {
			t.Errorf("after DeleteInstanceSnapshot, %s keeps %v", v, names)
		}
	}
	s.check(t, vda, "", a)
}

// testHold: a held snapshot cannot be deleted through Manager (ErrBusy)
// until released; holding a missing one is ErrNotFound.
func testHold(t *testing.T, s *suite) {
	m := snapshot.NewManager(s.b, nil)
	vol := s.volume(t, "hold")
	model := make([]byte, size)
	s.write(t, model, vol, 0, 1<<20, 'a')
	s.snapshot(t, vol, "s1")
	if _, err := m.Hold(s.ctx, vol, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Hold of a missing snapshot: %v; want ErrNotFound", err)
	}
	r1, err := m.Hold(s.ctx, vol, "s1")
	if err != nil {
		t.Fatal(err)
	}
	r2, err := m.Hold(s.ctx, vol, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteSnapshot(s.ctx, vol, "s1"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("DeleteSnapshot of a snapshot held twice: %v; want ErrBusy", err)
	}
	r1()
	r1() // a second call does nothing
	if err := m.DeleteSnapshot(s.ctx, vol, "s1"); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("DeleteSnapshot of a snapshot held once: %v; want ErrBusy", err)
	}
	r2()
	if err := m.DeleteSnapshot(s.ctx, vol, "s1"); err != nil {
		t.Fatalf("DeleteSnapshot after release: %v", err)
	}
	if _, err := s.b.Snapshot(s.ctx, vol, "s1"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after DeleteSnapshot: %v; want ErrNotFound", err)
	}
	if _, err := m.Hold(s.ctx, vol, "s1"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Hold of a deleted snapshot: %v; want ErrNotFound", err)
	}
	s.check(t, vol, "", model)
}

// testOpenOutlivesDelete: an image opened before its snapshot is deleted
// (without a Manager hold) keeps reading the snapshot's bytes, as the
// Backend documents: readers need not hold what they read.
func testOpenOutlivesDelete(t *testing.T, s *suite) {
	vol := s.volume(t, "outlive")
	model := make([]byte, size)
	s.write(t, model, vol, 0, 1<<20, 'a')
	s.write(t, model, vol, 9<<20, 1<<20, 'a')
	s.snapshot(t, vol, "s1")
	want := slices.Clone(model)
	img, err := s.b.OpenSnapshot(s.ctx, vol, "s1")
	if err != nil {
		t.Fatal(err)
	}
	s.write(t, model, vol, 0, 10<<20, 'b')
	s.snapshot(t, vol, "s2")
	if err := s.b.DeleteSnapshot(s.ctx, vol, "s1"); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if got := readImage(t, img); !bytes.Equal(got, want) {
		t.Errorf("an image opened before its snapshot was deleted reads %s", firstDiff(got, want))
	}
	s.check(t, vol, "s2", model)
}
