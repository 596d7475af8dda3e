//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	mathrand "math/rand/v2"
	"strings"
	"sync"
	"testing"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// history makes a volume of 24 MiB (6 objects) with snapshots s1, s2 and a
// head that differ by overwrites, new objects and discards. It returns the
// volume name.
func history(t *testing.T, p *Pool) string {
	t.Helper()
	c := ctx(t)
	name := uniqueName(t, "hist")
	if _, err := p.CreateVolume(c, name, 24<<20); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.DeleteVolume(ctx(t), name) })
	w := writer(t, name)
	writeAt(t, w, randomBytes(5<<20), 0)        // objects 0, 1
	writeAt(t, w, randomBytes(100), 17<<20+123) // object 4
	snap(t, p, name, "s1")
	writeAt(t, w, randomBytes(8192), 1<<20)             // inside object 0: exact diff
	writeAt(t, w, randomBytes(300<<10), 12<<20+7)       // new object 3
	if _, err := w.Discard(17<<20, 4<<20); err != nil { // object 4, whole
		t.Fatal(err)
	}
	snap(t, p, name, "s2")
	writeAt(t, w, randomBytes(4096), 20<<20) // object 5, head only
	return name
}

func snap(t *testing.T, p *Pool, vol, name string) snapshot.Snapshot {
	t.Helper()
	s, err := p.CreateSnapshots(ctx(t), []string{vol}, name, snapshot.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s[0]
}

// checkExport compares a whole image, read by ReadAt, with rbd export of
// spec.
func checkExport(t *testing.T, im qcow.Image, spec string) {
	t.Helper()
	want := rbdExport(t, spec)
	if int64(len(want)) != im.Size() {
		t.Fatalf("%s: size %d, rbd export gives %d", spec, im.Size(), len(want))
	}
	for _, step := range []int{8 << 20, 65536 + 512} {
		if got := readAll(t, im, step); !bytes.Equal(got, want) {
			t.Fatalf("%s: read in %d-byte pieces differs from rbd export", spec, step)
		}
	}
}

// dataSpans turns rbd diff output into the extents that exist, merged.
func dataSpans(d []diffExtent) []span {
	var s []span
	for _, e := range d {
		if e.Exists == "true" {
			s = append(s, span{e.Offset, e.Offset + e.Length})
		}
	}
	return normalize(s)
}

func TestSnapshots(t *testing.T) {
	p, c := pool(), ctx(t)
	name := history(t, p)
	snaps, err := p.ListSnapshots(c, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 2 || snaps[0].Name != "s1" || snaps[1].Name != "s2" || snaps[0].Parent != "" ||
		snaps[1].Parent != "s1" || snaps[1].Consistency != snapshot.CrashConsistent ||
		snaps[0].Size != 24<<20 || snaps[1].Path != "rbd:rbd/"+name+"@s2" || snaps[1].Created.Before(snaps[0].Created) {
		t.Errorf("snapshots: %+v", snaps)
	}
	for _, s := range []string{"s1", "s2"} {
		im, err := p.OpenSnapshot(c, name, s)
		if err != nil {
			t.Fatal(err)
		}
		checkExport(t, im, "rbd/"+name+"@"+s)
		// The allocation map is rbd's, whole objects, all of layer 0.
		ext, err := im.Extents(0, im.Size())
		if err != nil {
			t.Fatal(err)
		}
		var got []span
		for _, e := range ext {
			if e.Kind == qcow.Data {
				if e.Layer != 0 {
					t.Errorf("%s: extent %+v not of layer 0", s, e)
				}
				got = append(got, span{e.Offset, e.End()})
			} else if e.Kind != qcow.Unallocated || e.Layer != 1 {
				t.Errorf("%s: extent %+v", s, e)
			}
		}
		want := dataSpans(rbdDiff(t, "--whole-object", "rbd/"+name+"@"+s))
		if !equalSpans(normalize(got), want) {
			t.Errorf("%s: data extents %v, rbd diff --whole-object %v", s, got, want)
		}
		im.Close()
	}
	head, err := p.OpenHead(c, name)
	if err != nil {
		t.Fatal(err)
	}
	checkExport(t, head, "rbd/"+name)
	head.Close()

	// Changed is rbd diff, exactly.
	for _, tc := range []struct{ from, to string }{{"s1", "s2"}, {"", "s1"}, {"", "s2"}} {
		got, err := p.Changed(c, name, tc.from, tc.to)
		if err != nil {
			t.Fatal(err)
		}
		args := []string{"rbd/" + name + "@" + tc.to}
		if tc.from != "" {
			args = append([]string{"--from-snap", tc.from}, args...)
		}
		want := rbdDiff(t, args...)
		if !sameDiff(got, want) {
			t.Errorf("Changed(%q, %q) = %v\nrbd diff: %+v", tc.from, tc.to, got, want)
		}
	}
	// ... and s1 plus what changed, read from s2, is s2.
	changed, _ := p.Changed(c, name, "s1", "s2")
	img := rbdExport(t, "rbd/"+name+"@s1")
	s2 := rbdExport(t, "rbd/"+name+"@s2")
	sawZero := false
	for _, e := range changed {
		if e.Kind == qcow.Zero {
			sawZero = true
			clear(img[e.Offset:e.End()])
		} else {
			copy(img[e.Offset:e.End()], s2[e.Offset:e.End()])
		}
	}
	if !bytes.Equal(img, s2) || !sawZero {
		t.Errorf("s1 + Changed(s1, s2) is not s2 (or no Zero extent for the discard)")
	}
	if _, err := p.Changed(c, name, "s2", "s1"); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("Changed(s2, s1): %v, want ErrInvalid", err)
	}
	if _, err := p.Changed(c, name, "nope", "s1"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Changed(nope, s1): %v, want ErrNotFound", err)
	}

	// Names, errors.
	for _, bad := range []string{"", "latest", ".x", "a/b"} {
		if _, err := p.CreateSnapshots(c, []string{name}, bad, snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrInvalidName) {
			t.Errorf("snapshot %q: %v, want ErrInvalidName", bad, err)
		}
	}
	if _, err := p.CreateSnapshots(c, []string{name}, "s1", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("snapshot s1 again: %v, want ErrExists", err)
	}
	if _, err := p.OpenSnapshot(c, name, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("OpenSnapshot(nope): %v, want ErrNotFound", err)
	}
	if err := p.DeleteSnapshot(c, name, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("DeleteSnapshot(nope): %v, want ErrNotFound", err)
	}

	// Deleting s1 leaves s2 and the head as they were; s2's parent is gone.
	before := rbdExport(t, "rbd/"+name+"@s2")
	if err := p.DeleteSnapshot(c, name, "s1"); err != nil {
		t.Fatal(err)
	}
	snaps, _ = p.ListSnapshots(c, name)
	if len(snaps) != 1 || snaps[0].Name != "s2" || snaps[0].Parent != "" {
		t.Errorf("after deleting s1: %+v", snaps)
	}
	im, err := p.OpenSnapshot(c, name, "s2")
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, im, 1<<20); !bytes.Equal(got, before) {
		t.Errorf("s2 changed when s1 was deleted")
	}
	im.Close()
}

func equalSpans(a, b []span) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// sameDiff compares Changed's extents with rbd diff's (merged the same way).
func sameDiff(got []qcow.Extent, want []diffExtent) bool {
	var w []qcow.Extent
	for _, e := range want {
		kind := qcow.Zero
		if e.Exists == "true" {
			kind = qcow.Data
		}
		w = append(w, qcow.Extent{Offset: e.Offset, Length: e.Length, Kind: kind})
	}
	w = mergeExtents(w)
	if len(got) != len(w) {
		return false
	}
	for i := range w {
		if got[i] != w[i] {
			return false
		}
	}
	return true
}

func TestCreateSnapshotsConsistency(t *testing.T) {
	p, c := pool(), ctx(t)
	a, b := uniqueName(t, "grp-a"), uniqueName(t, "grp-b")
	for _, n := range []string{a, b} {
		if _, err := p.CreateVolume(c, n, 8<<20); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.DeleteVolume(ctx(t), n) })
	}
	check := func(snapName string, opts snapshot.SnapshotOptions, wantC snapshot.Consistency, wantM string) {
		t.Helper()
		out, err := p.CreateSnapshots(c, []string{a, b}, snapName, opts)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) != 2 || out[0].Volume != a || out[1].Volume != b {
			t.Fatalf("CreateSnapshots returned %+v", out)
		}
		for _, s := range out {
			if s.Consistency != wantC || !maps(s.Metadata, opts.Metadata) {
				t.Errorf("%s@%s: %s %v, want %s %v", s.Volume, s.Name, s.Consistency, s.Metadata, wantC, opts.Metadata)
			}
			if s.Method != wantM {
				t.Errorf("%s@%s: method %q, want %q", s.Volume, s.Name, s.Method, wantM)
			}
			// What is recorded, as a later reader of the pool sees it.
			if got, err := p.Snapshot(c, s.Volume, s.Name); err != nil || got.Method != wantM {
				t.Errorf("%s@%s read back: method %q (%v), want %q", s.Volume, s.Name, got.Method, err, wantM)
			}
		}
	}
	// Nobody has the images open: crash-consistent.
	check("idle", snapshot.SnapshotOptions{Metadata: map[string]string{"why": "test"}}, snapshot.CrashConsistent, MethodIdle)
	// A writer on one of them: one after the other, no guarantee...
	writer(t, b)
	check("busy", snapshot.SnapshotOptions{}, snapshot.None, MethodSequential)
	check("busy2", snapshot.SnapshotOptions{Consistency: snapshot.CrashConsistent}, snapshot.None, MethodSequential)
	// ... unless the caller froze the guest.
	check("frozen", snapshot.SnapshotOptions{Consistency: snapshot.Quiesced}, snapshot.Quiesced, MethodSequential)

	// All or none: b already has "taken", so a is not snapped either.
	if _, err := p.CreateSnapshots(c, []string{b}, "taken", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateSnapshots(c, []string{a, b}, "taken", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("snapshot existing on one volume: %v, want ErrExists", err)
	}
	if _, err := p.Snapshot(c, a, "taken"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("a got the snapshot anyway: %v", err)
	}
	if _, err := p.CreateSnapshots(c, []string{a, a}, "twice", snapshot.SnapshotOptions{}); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("a volume twice: %v, want ErrInvalid", err)
	}
	if _, err := p.CreateSnapshots(c, []string{a}, "m", snapshot.SnapshotOptions{Metadata: map[string]string{"k": strings.Repeat("v", 70000)}}); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("huge metadata: %v, want ErrInvalid", err)
	}
	// A snapshot taken by rbd itself shows, with no claim.
	cli(t, "rbd", "snap", "create", "rbd/"+a+"@byrbd")
	s, err := p.Snapshot(c, a, "byrbd")
	if err != nil || s.Consistency != snapshot.None || s.Parent != "frozen" {
		t.Errorf("snapshot made by rbd: %+v, %v", s, err)
	}
	// A volume open by another client is not deleted.
	if err := p.DeleteVolume(c, b); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("delete a volume open by another client: %v, want ErrBusy", err)
	}
}

func TestConcurrentReads(t *testing.T) {
	p, c := pool(), ctx(t)
	name := history(t, p)
	want := rbdExport(t, "rbd/"+name+"@s2")
	im, err := p.OpenSnapshot(c, name, "s2")
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	// Sequential readers from different places (readahead for each, in
	// one cache), and random reads, all at once.
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for r, start := range []int64{0, 0, 5<<20 + 3, 17 << 20} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			step := int64(128<<10 + r*4096)
			buf := make([]byte, step)
			for off := start; off < im.Size(); off += step {
				n, err := im.ReadAt(buf, off)
				if err != nil && !(errors.Is(err, io.EOF) && off+int64(n) == im.Size()) {
					errs <- err.Error()
					return
				}
				if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
					errs <- fmt.Sprintf("reader %d: wrong data at %d", r, off)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := mathrand.New(mathrand.NewPCG(1, 2))
		for range 200 {
			off := rng.Int64N(im.Size())
			buf := make([]byte, rng.IntN(3<<20)+1)
			n, err := im.ReadAt(buf, off)
			if err != nil && !errors.Is(err, io.EOF) {
				errs <- err.Error()
				return
			}
			if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
				errs <- fmt.Sprintf("random read: wrong data at %d+%d", off, len(buf))
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
