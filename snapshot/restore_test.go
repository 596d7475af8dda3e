package snapshot

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"snapfs/internal/qemutest"
)

// writeJSONFile writes v as meta.json does.
func writeJSONFile(t *testing.T, path string, v any) {
	t.Helper()
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeRaw writes snapshot snap of vol to path as a raw file (disk.raw).
func writeRaw(t *testing.T, s *LocalStore, vol, snap, path string) {
	t.Helper()
	img, err := s.OpenSnapshot(context.Background(), vol, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, io.NewSectionReader(img, 0, img.Size())); err != nil {
		t.Fatal(err)
	}
}

// exportInstanceSnapshot writes what instances/INST/snapshots/SNAP serves
// into dir: meta.json and, for each disk, DEV.qcow2 (the first disk) or
// DEV.raw (the others), as `cp -r` of the folder would copy (one format is
// enough; both are tested).
func exportInstanceSnapshot(t *testing.T, s *LocalStore, inst, snap, dir string) {
	t.Helper()
	ctx := context.Background()
	meta, err := InstanceSnapshotMetaFor(ctx, s, s, inst, snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeJSONFile(t, filepath.Join(dir, MetaFileName), meta)
	for i, d := range meta.Disks {
		if i == 0 {
			x, err := FullExport(ctx, s, d.Volume, d.Snapshot)
			writeExport(t, x, err, filepath.Join(dir, d.Device+".qcow2"))
		} else {
			writeRaw(t, s, d.Volume, d.Snapshot, filepath.Join(dir, d.Device+".raw"))
		}
	}
}

// exportVolumeSnapshot writes volumes/VOL/snapshots/SNAP/{disk.qcow2,
// meta.json} into dir.
func exportVolumeSnapshot(t *testing.T, s *LocalStore, vol, snap, dir string) {
	t.Helper()
	ctx := context.Background()
	meta, err := VolumeSnapshotMetaFor(ctx, s, vol, snap)
	if err != nil {
		t.Fatal(err)
	}
	x, err := FullExport(ctx, s, vol, snap)
	writeExport(t, x, err, filepath.Join(dir, VolumeDiskName+".qcow2"))
	writeJSONFile(t, filepath.Join(dir, MetaFileName), meta)
}

// instanceFixture makes instance web (vda = root, imported with volume
// metadata; vdb = data) with snapshot nightly (with metadata), and writes
// to both heads afterwards.
func instanceFixture(t *testing.T, s *LocalStore) {
	t.Helper()
	ctx := context.Background()
	src := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "root.qcow2"), "6M")
	qemutest.IO(t, src, "write -P 0x11 0 2M", "write -P 0x12 5M 64k")
	if _, err := importFile(ctx, s, "root", src, map[string]string{"os": "debian", "role": "root disk"}); err != nil {
		t.Fatal(err)
	}
	writeHead(t, s, "root", "write -P 0x13 1M 64k", "write -z 0 64k")
	mustVolume(t, s, "data", 3<<20)
	writeHead(t, s, "data", "write -P 0x21 512k 1M")
	if _, err := s.CreateInstance(ctx, "web", []Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "data"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewManager(s, s).SnapshotInstance(ctx, "web", "nightly", map[string]string{"why": "backup"}); err != nil {
		t.Fatal(err)
	}
	writeHead(t, s, "root", "write -P 0x14 0 1M")
	writeHead(t, s, "data", "write -P 0x22 0 1M")
}

// TestRestoreInstance: an instance snapshot folder copied out of the mount
// and restored gives new volumes with the same content, metadata and
// device mapping, and an instance snapshot record like the original.
func TestRestoreInstance(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := openStore(t)
	instanceFixture(t, s)
	dir := filepath.Join(t.TempDir(), "nightly")
	exportInstanceSnapshot(t, s, "web", "nightly", dir)
	orig, err := s.InstanceSnapshot(ctx, "web", "nightly")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{} // device -> content
	for _, d := range orig.Disks {
		img, err := s.OpenSnapshot(ctx, d.Volume, d.Snapshot)
		if err != nil {
			t.Fatal(err)
		}
		want[d.Device] = readImage(t, img)
	}
	if ok, err := RestoreReady(dir); !ok || err != nil {
		t.Fatalf("RestoreReady: %v %v", ok, err)
	}

	// Into the same store: web is taken, so web-restored.
	check := func(s *LocalStore, wantName string) {
		t.Helper()
		before := layerFiles(t, s)
		res, err := RestoreDir(ctx, s, dir, "")
		if err != nil {
			t.Fatal(err)
		}
		in := res.Instance
		if in == nil || in.Name != wantName || len(res.Volumes) != 2 {
			t.Fatalf("restored %+v", res)
		}
		wantDisks := []Disk{{Device: "vda", Volume: wantName + "-vda"}, {Device: "vdb", Volume: wantName + "-vdb"}}
		if !slices.Equal(in.Disks, wantDisks) {
			t.Errorf("disks %v, want %v", in.Disks, wantDisks)
		}
		rec, err := s.InstanceSnapshot(ctx, wantName, "nightly")
		if err != nil {
			t.Fatal(err)
		}
		if !rec.Created.Equal(orig.Created) || rec.Consistency != orig.Consistency || rec.Metadata["why"] != "backup" {
			t.Errorf("instance snapshot %+v, original %+v", rec, orig)
		}
		for _, d := range in.Disks {
			img, err := s.OpenHead(ctx, d.Volume)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readImage(t, img), want[d.Device]) {
				t.Errorf("%s (%s) does not read as the original", d.Device, d.Volume)
			}
			st := capture(t, s, d.Volume) // and qemu-img agrees
			if !bytes.Equal(st["nightly"], want[d.Device]) {
				t.Errorf("%s: snapshot nightly does not read as the original", d.Volume)
			}
			snap, err := s.Snapshot(ctx, d.Volume, "nightly")
			if err != nil {
				t.Fatal(err)
			}
			if snap.Instance != wantName || !snap.Created.Equal(orig.Created) {
				t.Errorf("restored disk snapshot %+v", snap)
			}
		}
		v, err := s.Volume(ctx, wantName+"-vda")
		if err != nil {
			t.Fatal(err)
		}
		if v.Metadata["os"] != "debian" || v.Metadata["role"] != "root disk" {
			t.Errorf("volume metadata %v", v.Metadata)
		}
		// Two files a disk: the snapshot's layer and the head.
		if len(layerFiles(t, s)) != len(before)+4 {
			t.Errorf("%d layer files, want %d", len(layerFiles(t, s)), len(before)+4)
		}
		// The restored instance is an instance like any other: its
		// snapshot merges into the heads.
		if err := NewManager(s, s).DeleteInstanceSnapshot(ctx, wantName, "nightly"); err != nil {
			t.Fatal(err)
		}
		for _, d := range in.Disks {
			img, err := s.OpenHead(ctx, d.Volume)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readImage(t, img), want[d.Device]) {
				t.Errorf("%s reads differently after its snapshot was deleted", d.Volume)
			}
		}
		checkNoStrayFiles(t, s)
	}
	check(s, "web-restored")
	check(s, "web-restored-2")
	// Into a new store (a disaster recovery): the original names.
	check(openStore(t), "web")

	// The folder keeps the snapshot's name: default names; renamed: its
	// name.
	if got := RestoreName(dir); got != "" {
		t.Errorf("RestoreName(%s) = %q", dir, got)
	}
	renamed := filepath.Join(t.TempDir(), "web2")
	if err := os.Rename(dir, renamed); err != nil {
		t.Fatal(err)
	}
	dir = renamed
	if got := RestoreName(dir); got != "web2" {
		t.Errorf("RestoreName(%s) = %q", dir, got)
	}
	if got := RestoreName(t.TempDir() + "/nothing"); got != "nothing" {
		t.Errorf("RestoreName of a folder without meta.json = %q", got)
	}
	// A name that is taken.
	if _, err := RestoreInstance(ctx, s, dir, "web"); !errors.Is(err, ErrExists) {
		t.Errorf("restore over an existing instance: %v", err)
	}
	in, err := RestoreInstance(ctx, s, dir, "copy")
	if err != nil || in.Name != "copy" || in.Disks[1].Volume != "copy-vdb" {
		t.Errorf("restore as copy: %+v %v", in, err)
	}
	res, err := NewManager(s, s).RestoreDir(ctx, dir, RestoreName(dir))
	if err != nil || res.Instance == nil || res.Instance.Name != "web2" {
		t.Errorf("Manager.RestoreDir as web2: %+v %v", res, err)
	}
}

// TestRestoreVolume: a volume snapshot folder, or its disk file with the
// meta.json beside it, restores a volume with its metadata and snapshot.
func TestRestoreVolume(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := openStore(t)
	buildChain(t, s, "vm")
	meta := map[string]string{"purpose": "test"}
	if _, err := s.CreateSnapshots(ctx, []string{"vm"}, "tagged", SnapshotOptions{Metadata: meta, Consistency: Quiesced}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "tagged")
	exportVolumeSnapshot(t, s, "vm", "tagged", dir)
	want := capture(t, s, "vm")["tagged"]

	res, err := RestoreDir(ctx, s, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Volume == nil || res.Volume.Name != "vm-restored" || res.Instance != nil {
		t.Fatalf("restored %+v", res)
	}
	st := capture(t, s, "vm-restored")
	if !bytes.Equal(st[""], want) || !bytes.Equal(st["tagged"], want) || len(st) != 2 {
		t.Error("the restored volume does not read as the snapshot")
	}
	snap, err := s.Snapshot(ctx, "vm-restored", "tagged")
	if err != nil {
		t.Fatal(err)
	}
	orig, _ := s.Snapshot(ctx, "vm", "tagged")
	if snap.Metadata["purpose"] != "test" || snap.Consistency != Quiesced || !snap.Created.Equal(orig.Created) || snap.Instance != "" {
		t.Errorf("restored snapshot %+v", snap)
	}
	// The disk file with meta.json beside it, under a given name.
	v, err := RestoreVolume(ctx, s, filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, MetaFileName), "named")
	if err != nil {
		t.Fatal(err)
	}
	if img, err := s.OpenHead(ctx, v.Name); err != nil || !bytes.Equal(readImage(t, img), want) {
		t.Errorf("named: %v", err)
	}
	if _, err := RestoreVolume(ctx, s, filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, MetaFileName), "named"); !errors.Is(err, ErrExists) {
		t.Errorf("restore over an existing volume: %v", err)
	}
	// An instance snapshot's meta.json is not a volume's.
	idir := filepath.Join(t.TempDir(), "inst")
	if err := os.MkdirAll(idir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeJSONFile(t, filepath.Join(idir, MetaFileName), InstanceSnapshotMeta{Kind: KindInstanceSnapshot, Version: 1})
	if _, err := RestoreVolume(ctx, s, filepath.Join(dir, "disk.qcow2"), filepath.Join(idir, MetaFileName), "x"); !errors.Is(err, ErrInvalid) {
		t.Errorf("volume restore with an instance meta.json: %v", err)
	}
	checkNoStrayFiles(t, s)
}

// TestRestoreHostile: every file of a folder is untrusted. Each bad folder
// is refused with a message, and nothing is created.
func TestRestoreHostile(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	instanceFixture(t, s)
	good := filepath.Join(t.TempDir(), "good")
	exportInstanceSnapshot(t, s, "web", "nightly", good)
	var meta InstanceSnapshotMeta
	data, err := os.ReadFile(filepath.Join(good, MetaFileName))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		t.Fatal(err)
	}
	// variant copies the good folder into a new one and lets change spoil
	// it.
	variant := func(change func(dir string)) string {
		dir := filepath.Join(t.TempDir(), "bad")
		if out, err := execCommand("cp", "-r", good, dir); err != nil {
			t.Fatalf("cp: %v: %s", err, out)
		}
		change(dir)
		return dir
	}
	withMeta := func(edit func(m *InstanceSnapshotMeta)) func(dir string) {
		return func(dir string) {
			m := meta
			m.Disks = slices.Clone(meta.Disks)
			edit(&m)
			writeJSONFile(t, filepath.Join(dir, MetaFileName), m)
		}
	}
	backing := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "b.qcow2"), "6M", "-u", "-b", "/etc/passwd", "-F", "raw")
	for _, c := range []struct {
		name string
		dir  string
		want []string
	}{
		{"no meta.json", variant(func(dir string) { os.Remove(filepath.Join(dir, MetaFileName)) }), []string{"no meta.json"}},
		{"not JSON", variant(func(dir string) { os.WriteFile(filepath.Join(dir, MetaFileName), []byte("{nope"), 0o600) }), []string{"not a snapfs meta.json"}},
		{"huge meta.json", variant(func(dir string) {
			os.WriteFile(filepath.Join(dir, MetaFileName), bytes.Repeat([]byte(" "), maxMetaFileBytes+1), 0o600)
		}), []string{"not a snapfs meta.json"}},
		{"unknown kind", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Kind = "vm" })), []string{`kind "vm"`}},
		{"newer version", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Version = 99 })), []string{"version 99"}},
		{"device with a slash", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Disks[0].Device = "../vda" })), []string{"device name"}},
		{"device twice", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Disks[1].Device = "vda" })), []string{"twice"}},
		{"no disks", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Disks = nil })), []string{"0 disks"}},
		{"bad consistency", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Consistency = "perfect" })), []string{"perfect"}},
		{"size mismatch", variant(withMeta(func(m *InstanceSnapshotMeta) { m.Disks[1].Size = 1 << 20 })), []string{"meta.json says"}},
		{"missing disk", variant(func(dir string) { os.Remove(filepath.Join(dir, "vdb.raw")) }), []string{"neither vdb.qcow2 nor vdb.raw"}},
		{"disk is a symlink", variant(func(dir string) {
			os.Remove(filepath.Join(dir, "vdb.raw"))
			os.Symlink("/etc/passwd", filepath.Join(dir, "vdb.raw"))
		}), []string{"symbolic link"}},
		{"meta.json is a symlink", variant(func(dir string) {
			os.Rename(filepath.Join(dir, MetaFileName), filepath.Join(dir, "m"))
			os.Symlink("m", filepath.Join(dir, MetaFileName))
		}), []string{"symbolic link"}},
		{"disk is a directory", variant(func(dir string) {
			os.Remove(filepath.Join(dir, "vdb.raw"))
			os.Mkdir(filepath.Join(dir, "vdb.raw"), 0o700)
		}), []string{"not a regular file"}},
		{"disk with a backing file", variant(func(dir string) {
			os.Remove(filepath.Join(dir, "vda.qcow2"))
			copyFile(t, backing, filepath.Join(dir, "vda.qcow2"))
		}), []string{"backing file", "/etc/passwd"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := layerFiles(t, s)
			vols, _ := s.ListVolumes(ctx)
			_, err := RestoreDir(ctx, s, c.dir, "")
			if err == nil {
				t.Fatal("restored")
			}
			var ie *ImportError
			if !errors.As(err, &ie) || !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v (%T) is not an *ImportError wrapping ErrInvalid", err, err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			after, _ := s.ListVolumes(ctx)
			if len(after) != len(vols) || !slices.Equal(layerFiles(t, s), before) {
				t.Error("the refused restore left something behind")
			}
			if _, err := s.Instance(ctx, "web-restored"); !errors.Is(err, ErrNotFound) {
				t.Errorf("an instance appeared: %v", err)
			}
		})
	}
	if ok, err := RestoreReady(variant(func(dir string) { os.Remove(filepath.Join(dir, "vdb.raw")) })); ok || err != nil {
		t.Errorf("RestoreReady without a disk: %v %v", ok, err)
	}
	if ok, err := RestoreReady(t.TempDir()); ok || err != nil {
		t.Errorf("RestoreReady of an empty folder: %v %v", ok, err)
	}
}

// TestRestoreAtomic: a restore cut short while its second disk is being
// written leaves nothing: no volume, no instance, no file.
func TestRestoreAtomic(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	instanceFixture(t, s)
	dir := filepath.Join(t.TempDir(), "nightly")
	exportInstanceSnapshot(t, s, "web", "nightly", dir)
	before := layerFiles(t, s)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Cancel once data is being written. Progress comes from several
	// goroutines, and whether the second disk's total shows before the
	// first progress report depends on scheduling, so the test does not
	// wait for it: any point after the copying began must leave nothing.
	pctx := WithProgress(cctx, func(done, total int64) {
		if done > 0 {
			cancel()
		}
	})
	if _, err := RestoreDir(pctx, s, dir, "copy"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled restore: %v", err)
	}
	if _, err := s.Volume(ctx, "copy-vda"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the first disk's volume appeared: %v", err)
	}
	if _, err := s.Instance(ctx, "copy"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the instance appeared: %v", err)
	}
	if !slices.Equal(layerFiles(t, s), before) {
		t.Error("files left behind")
	}
}

// copyFile copies a file.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// execCommand runs a command and returns its combined output.
func execCommand(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}
