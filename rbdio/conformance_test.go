//go:build ceph && pacific && cgo

package rbdio

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/qcow"
	"snapfs/snapshot"
	"snapfs/snapshot/backendtest"
)

// TestConformance runs the backend conformance suite against the test
// pool of the real cluster: librbd writes into the heads as a VM would,
// and `rbd export` and `rbd export-diff` are the oracles. Subtests share
// the pool; the suite names their volumes uniquely.
func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) snapshot.Backend { return pool() },
		Write: func(t *testing.T, b snapshot.Backend, volume string, off int64, data []byte) {
			t.Helper()
			io, err := b.(*Pool).io()
			if err != nil {
				t.Fatal(err)
			}
			img, err := rbd.OpenImage(io, volume, rbd.NoSnapshot)
			if err != nil {
				t.Fatalf("opening %s: %v", volume, err)
			}
			defer img.Close()
			if _, err := img.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
		},
		Reference: func(t *testing.T, b snapshot.Backend, volume, snap string) []byte {
			t.Helper()
			spec := b.(*Pool).spec(volume)
			if snap != "" {
				spec += "@" + snap
			}
			return rbdExport(t, spec)
		},
		ChangedReference: func(t *testing.T, b snapshot.Backend, volume, from, to string) []qcow.Extent {
			t.Helper()
			return exportDiff(t, b.(*Pool).spec(volume)+"@"+to, from)
		},
		// rbd reports changes by object when fast-diff is on.
		Granularity: 4 << 20,
	})
}

// exportDiff returns the ranges `rbd export-diff --from-snap from spec -`
// writes ('w' data and 'z' zero records of the "rbd diff v1" format).
func exportDiff(t *testing.T, spec, from string) []qcow.Extent {
	t.Helper()
	cmd := exec.Command("rbd", "-c", cephConf, "export-diff", "--no-progress", "--from-snap", from, spec, "-")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("rbd export-diff %s: %v", spec, err)
	}
	r := bufio.NewReader(bytes.NewReader(out))
	const header = "rbd diff v1\n"
	h := make([]byte, len(header))
	if _, err := io.ReadFull(r, h); err != nil || string(h) != header {
		t.Fatalf("rbd export-diff: header %q, %v", h, err)
	}
	var exts []qcow.Extent
	u64 := func() int64 {
		var v uint64
		if err := binary.Read(r, binary.LittleEndian, &v); err != nil {
			t.Fatalf("rbd export-diff: %v", err)
		}
		return int64(v)
	}
	for {
		tag, err := r.ReadByte()
		if err != nil {
			t.Fatalf("rbd export-diff: no end record: %v", err)
		}
		switch tag {
		case 'f', 't': // from/to snapshot name
			var n uint32
			if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
				t.Fatal(err)
			}
			if _, err := r.Discard(int(n)); err != nil {
				t.Fatal(err)
			}
		case 's': // image size
			u64()
		case 'w', 'z':
			off, n := u64(), u64()
			kind := qcow.Data
			if tag == 'z' {
				kind = qcow.Zero
			} else if _, err := r.Discard(int(n)); err != nil {
				t.Fatal(err)
			}
			exts = append(exts, qcow.Extent{Offset: off, Length: n, Kind: kind})
		case 'e':
			return exts
		default:
			t.Fatalf("rbd export-diff: unknown record %q", tag)
		}
	}
}

// TestDeleteOpenSnapshot: a snapshot deleted while this process reads it
// is hidden, not removed (the conformance suite checks the reader's bytes),
// and removed from the cluster when its last reader closes.
func TestDeleteOpenSnapshot(t *testing.T) {
	c := ctx(t)
	p := pool()
	vol := uniqueName(t, "delopen")
	if _, err := p.CreateVolume(c, vol, 8<<20); err != nil {
		t.Fatal(err)
	}
	defer p.DeleteVolume(c, vol)
	snap(t, p, vol, "s1")
	img, err := p.OpenSnapshot(c, vol, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(c, vol, "s1"); err != nil {
		t.Fatal(err)
	}
	names := func() string { return string(cli(t, "rbd", "snap", "ls", "--format", "json", p.spec(vol))) }
	if s := names(); !strings.Contains(s, hiddenPrefix) || strings.Contains(s, `"s1"`) {
		t.Errorf("while open, rbd snap ls = %s; want only a hidden snapshot", s)
	}
	if list, err := p.ListSnapshots(c, vol); err != nil || len(list) != 0 {
		t.Errorf("ListSnapshots = %+v, %v; want none", list, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if s := names(); s != "[]" && s != "[]\n" {
		t.Errorf("after the last reader closed, rbd snap ls = %s; want none", s)
	}
}

// TestHiddenSnapshotSweep: a hidden snapshot left by a process that died
// (no client holds its image) is removed by the next snapshot delete on
// the image; one that a live process hides, and holds the image open for,
// is not, and its reader there keeps reading it.
func TestHiddenSnapshotSweep(t *testing.T) {
	c := ctx(t)
	p := pool()
	vol := uniqueName(t, "hidden")
	if _, err := p.CreateVolume(c, vol, 8<<20); err != nil {
		t.Fatal(err)
	}
	defer p.DeleteVolume(c, vol)
	names := func() string { return string(cli(t, "rbd", "snap", "ls", "--format", "json", p.spec(vol))) }

	// Left by a process that died: renamed, and nobody holds the image.
	snap(t, p, vol, "s1")
	snap(t, p, vol, "s2")
	cli(t, "rbd", "snap", "rename", p.spec(vol)+"@s1", p.spec(vol)+"@"+hiddenPrefix+"999")
	if err := p.DeleteSnapshot(c, vol, "s2"); err != nil {
		t.Fatal(err)
	}
	if s := names(); strings.Contains(s, hiddenPrefix) {
		t.Errorf("after a delete, rbd snap ls = %s; the orphan is still there", s)
	}

	// Hidden by another live client (another process) that reads it.
	other, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	op := other.Pools()[0]
	cli(t, "rbd", "bench", "--io-type", "write", "--io-total", "4M", p.spec(vol))
	snap(t, p, vol, "s3")
	want := cli(t, "rbd", "export", p.spec(vol)+"@s3", "-")
	img, err := op.OpenSnapshot(c, vol, "s3")
	if err != nil {
		t.Fatal(err)
	}
	if err := op.DeleteSnapshot(c, vol, "s3"); err != nil {
		t.Fatal(err)
	}
	snap(t, p, vol, "s4")
	if err := p.DeleteSnapshot(c, vol, "s4"); err != nil {
		t.Fatal(err)
	}
	if s := names(); !strings.Contains(s, hiddenPrefix) {
		t.Errorf("rbd snap ls = %s: the snapshot another client reads was swept", s)
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("the other client's reader reads wrong bytes after the sweep")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if s := names(); strings.Contains(s, hiddenPrefix) {
		t.Errorf("after its reader closed, rbd snap ls = %s", s)
	}
}
