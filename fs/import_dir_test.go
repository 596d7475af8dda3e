package fs

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// importedVolume makes volume name of store from a qcow2 of size written
// by qemu-io, with user metadata meta.
func importedVolume(t testing.TB, store *snapshot.LocalStore, name, size string, meta map[string]string, writes ...string) {
	t.Helper()
	src := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), name+".qcow2"), size)
	qemutest.IO(t, src, writes...)
	img, err := snapshot.OpenUntrusted(src)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := store.ImportVolume(t.Context(), name, img, meta); err != nil {
		t.Fatal(err)
	}
}

// readJSON decodes the JSON file at path into v.
func readJSON(t testing.TB, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// checkExchangeMeta fails the test unless the meta.json of a folder copied
// out of the mount is what a restore reads (snapshot/exchange.go), of
// kind want.
func checkExchangeMeta(t testing.TB, folder, want string) {
	t.Helper()
	var head struct {
		Kind string `json:"kind"`
	}
	readJSON(t, filepath.Join(folder, "meta.json"), &head)
	if head.Kind != want {
		t.Fatalf("meta.json copied out of the mount has kind %q, want %q: the tree must serve snapshot.%s",
			head.Kind, want, map[string]string{snapshot.KindVolumeSnapshot: "VolumeSnapshotMetaFor", snapshot.KindInstanceSnapshot: "InstanceSnapshotMetaFor"}[want])
	}
}

// cpR copies with cp and its flags, failing the test if cp fails.
func cpR(t testing.TB, args ...string) {
	t.Helper()
	if out, err := run("cp", args...); err != nil {
		t.Fatalf("cp %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// TestImportFolderInstance is issue 4's round trip: an instance snapshot
// folder copied out of the mount with cp -r, and copied back into
// import/, restores as new volumes plus an instance with the same device
// mapping and metadata, whose disks read byte for byte as the snapshot's
// (and as qemu-img reads the original layers).
func TestImportFolderInstance(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	ctx := t.Context()
	importedVolume(t, store, "root", "32M", map[string]string{"role": "root"}, "write -P 0x61 0 8M", "write -P 0x62 20M 4M")
	importedVolume(t, store, "data", "16M", map[string]string{"role": "data"}, "write -P 0x63 2M 6M")
	if _, err := store.CreateInstance(ctx, "web", []snapshot.Disk{{Device: "vda", Volume: "root"}, {Device: "vdb", Volume: "data"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.CreateInstanceSnapshot(ctx, "web", "nightly", snapshot.InstanceSnapshotOptions{Metadata: map[string]string{"reason": "backup"}}); err != nil {
		t.Fatal(err)
	}
	// Written after the snapshot: the restore must not see it.
	writeHead(t, store, "root", "write -P 0x64 0 1M")
	m := testMount(t, store, stagingIn(staging))
	backup := t.TempDir()
	cpR(t, "-r", m.path("instances/web/snapshots/nightly"), backup)
	folder := filepath.Join(backup, "nightly")
	checkExchangeMeta(t, folder, snapshot.KindInstanceSnapshot)

	// Copied back under its own name: the instance keeps its name if
	// free, else gets "-restored" (web is taken).
	cpR(t, "-r", folder, m.path("import")+"/")
	checkRestoredInstance(t, m, folder, "web-restored", map[string]string{"vda": "root", "vdb": "data"})

	// Only meta.json and the qcow2 disks, under another name: the store
	// takes the staged qcow2 files over as they are, no second copy.
	again := m.path("import", "again")
	if err := os.Mkdir(again, 0o700); err != nil {
		t.Fatal(err)
	}
	cpR(t, filepath.Join(folder, "vda.qcow2"), filepath.Join(folder, "vdb.qcow2"), filepath.Join(folder, "meta.json"), again)
	checkRestoredInstance(t, m, folder, "again", map[string]string{"vda": "root", "vdb": "data"})
	for _, dev := range []string{"vda", "vdb"} {
		if err := compareFiles(filepath.Join(folder, dev+".qcow2"), baseLayer(t, m, "again-"+dev)); err != nil {
			t.Errorf("%s: the base layer is not the staged qcow2 as it is: %v", dev, err)
		}
	}

	// The folders stay a while, read-only; rm -r removes them at once.
	if got := readDir(t, m.path("import")); strings.Join(got, " ") != "again nightly" {
		t.Errorf("import/ after the restores: %v", got)
	}
	mustFail(t, "write into a restored folder's file", os.WriteFile(m.path("import/nightly/meta.json"), nil, 0o600), syscall.EEXIST)
	if out, err := run("rm", "-r", m.path("import", "nightly"), again); err != nil {
		t.Fatalf("rm -r: %v: %s", err, out)
	}
	noLeftovers(t, m, staging)
}

// checkRestoredInstance checks instance name, restored from the copied-out
// folder of the instance snapshot "nightly", whose disks came from volumes
// (device -> volume).
func checkRestoredInstance(t *testing.T, m *mounted, folder, name string, volumes map[string]string) {
	t.Helper()
	ctx := t.Context()
	var orig, got snapshot.InstanceSnapshotMeta
	readJSON(t, filepath.Join(folder, "meta.json"), &orig)
	readJSON(t, m.path("instances", name, "snapshots", "nightly", "meta.json"), &got)
	if got.Instance != name || !got.Created.Equal(orig.Created) || got.Consistency != orig.Consistency || !maps.Equal(got.Metadata, orig.Metadata) {
		t.Errorf("restored instance snapshot %+v, want %+v as %s", got, orig, name)
	}
	if len(got.Disks) != len(orig.Disks) {
		t.Fatalf("restored disks %+v, want %+v", got.Disks, orig.Disks)
	}
	for i, d := range got.Disks {
		o := orig.Disks[i]
		vol := name + "-" + d.Device
		if d.Device != o.Device || d.Volume != vol || d.Size != o.Size || !maps.Equal(d.VolumeMetadata, o.VolumeMetadata) || !maps.Equal(d.Metadata, o.Metadata) {
			t.Errorf("restored disk %+v, want %+v on volume %s", d, o, vol)
		}
		if target, err := os.Readlink(m.path("instances", name, "disks", d.Device)); err != nil || target != "../../../volumes/"+vol {
			t.Errorf("instances/%s/disks/%s -> %q, %v", name, d.Device, target, err)
		}
		disk := m.path("volumes", vol, "snapshots", "nightly", "disk.raw")
		sameContent(t, disk, filepath.Join(folder, d.Device+".raw"))
		sameContent(t, disk, qemutest.ConvertRawFile(t, snapshotPath(t, m.store, volumes[d.Device], "nightly")))
		v, err := m.store.Volume(ctx, vol)
		if err != nil {
			t.Fatal(err)
		}
		if want := map[string]string{"role": volumes[d.Device]}; !maps.Equal(v.Metadata, want) {
			t.Errorf("volume %s metadata %v, want %v", vol, v.Metadata, want)
		}
	}
}

// TestImportFolderVolume: one volume's snapshot folder (disk.qcow2,
// disk.raw, meta.json, the parent link, whatever else the folder holds),
// copied out and back with cp -a, restores a volume with the snapshot and
// its metadata; cp succeeds although the folder holds more than the
// restore reads.
func TestImportFolderVolume(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	ctx := t.Context()
	importedVolume(t, store, "v", "24M", map[string]string{"owner": "ops"}, "write -P 0x71 0 4M")
	if _, err := store.CreateSnapshots(ctx, []string{"v"}, "s1", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "v", "write -P 0x72 8M 4M")
	if _, err := store.CreateSnapshots(ctx, []string{"v"}, "s2", snapshot.SnapshotOptions{Metadata: map[string]string{"ticket": "42"}}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store, stagingIn(staging))
	backup := t.TempDir()
	cpR(t, "-a", m.path("volumes/v/snapshots/s2"), backup)
	folder := filepath.Join(backup, "s2")
	checkExchangeMeta(t, folder, snapshot.KindVolumeSnapshot)
	if _, err := os.Lstat(filepath.Join(folder, "parent")); err != nil {
		t.Fatalf("the copied folder has no parent link: %v", err)
	}

	cpR(t, "-a", folder, m.path("import", "copy"))
	var orig, got snapshot.VolumeSnapshotMeta
	readJSON(t, filepath.Join(folder, "meta.json"), &orig)
	readJSON(t, m.path("volumes/copy/snapshots/s2/meta.json"), &got)
	if got.Volume != "copy" || got.Name != "s2" || !got.Created.Equal(orig.Created) || got.Size != orig.Size ||
		!maps.Equal(got.Metadata, orig.Metadata) || !maps.Equal(got.VolumeMetadata, orig.VolumeMetadata) {
		t.Errorf("restored snapshot %+v, want %+v as volume copy", got, orig)
	}
	sameContent(t, m.path("volumes/copy/snapshots/s2/disk.raw"), filepath.Join(folder, "disk.raw"))
	sameContent(t, m.path("volumes/copy/head.raw"), qemutest.ConvertRawFile(t, snapshotPath(t, store, "v", "s2")))
	if out, err := run("rm", "-r", m.path("import", "copy")); err != nil {
		t.Fatalf("rm -r: %v: %s", err, out)
	}
	noLeftovers(t, m, staging)
}

// TestImportFolderRefused: a hostile disk in a folder (a qcow2 whose
// backing file is /etc/passwd), a meta.json that is not one, a disk that
// is a symbolic link: the close that completes the folder fails, cp says
// so, the log says why, and nothing is created or left behind.
func TestImportFolderRefused(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	ctx := t.Context()
	importedVolume(t, store, "v", "1M", nil, "write -P 0x73 0 64k")
	if _, err := store.CreateSnapshots(ctx, []string{"v"}, "s", snapshot.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	m := testMount(t, store, stagingIn(staging))
	// The folder of snapshot s, as volumes/v/snapshots/s shows it.
	good := t.TempDir()
	meta, err := snapshot.VolumeSnapshotMetaFor(ctx, store, "v", "s")
	if err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(meta)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(good, "meta.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	cpR(t, qemutest.ConvertRawFile(t, snapshotPath(t, store, "v", "s")), filepath.Join(good, "disk.raw"))

	hostile := func(name string, change func(dir string)) string {
		dir := filepath.Join(t.TempDir(), name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		cpR(t, filepath.Join(good, "meta.json"), filepath.Join(good, "disk.raw"), dir)
		change(dir)
		return dir
	}
	folders := []struct{ dir, says string }{
		{hostile("passwd", func(dir string) {
			os.Remove(filepath.Join(dir, "disk.raw"))
			qemutest.Create(t, "qcow2", filepath.Join(dir, "disk.qcow2"), "1M", "-u", "-b", "/etc/passwd", "-F", "raw")
		}), `backing file ("/etc/passwd")`},
		{hostile("garbage", func(dir string) {
			if err := os.WriteFile(filepath.Join(dir, "meta.json"), []byte("{not json"), 0o600); err != nil {
				t.Fatal(err)
			}
		}), "not a snapfs meta.json"},
		{hostile("link", func(dir string) {
			os.Remove(filepath.Join(dir, "disk.raw"))
			if err := os.Symlink("/etc/passwd", filepath.Join(dir, "disk.raw")); err != nil {
				t.Fatal(err)
			}
		}), "symbolic link"},
	}
	for _, c := range folders {
		name := filepath.Base(c.dir)
		out, err := run("cp", "-r", c.dir, m.path("import")+"/")
		if err == nil || !strings.Contains(out, "Invalid argument") {
			t.Errorf("cp -r %s: %v: %q, want Invalid argument", name, err, out)
		}
		logged := lines(m.log.String(), "restore of import/"+name+" failed")
		if len(logged) != 1 || !strings.Contains(logged[0], c.says) {
			t.Errorf("%s: log %q does not say %q", name, logged, c.says)
		}
		t.Logf("%s: cp says %q; log: %s", name, strings.TrimSpace(out), logged)
		if out, err := run("rm", "-r", m.path("import", name)); err != nil {
			t.Errorf("rm -r import/%s: %v: %s", name, err, out)
		}
	}
	if vols, _ := store.ListVolumes(ctx); len(vols) != 1 {
		t.Errorf("volumes after refused restores: %v", vols)
	}
	if ins, _ := store.ListInstances(ctx); len(ins) != 0 {
		t.Errorf("instances after refused restores: %v", ins)
	}
	noLeftovers(t, m, staging)
}

// TestImportFolderAbandoned: a folder removed before it is complete
// restores nothing and leaves nothing; a cp -r killed in the middle
// leaves a folder that rm -r removes.
func TestImportFolderAbandoned(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	dir := m.path("import", "half")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "disk.raw"), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "since"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "rmdir of a folder with files", syscall.Rmdir(dir), syscall.ENOTEMPTY)
	if out, err := run("rm", "-r", dir); err != nil {
		t.Fatalf("rm -r: %v: %s", err, out)
	}
	if vols, _ := store.ListVolumes(t.Context()); len(vols) != 0 {
		t.Errorf("volumes after an abandoned folder: %v", vols)
	}
	if logged := lines(m.log.String(), "import/half abandoned"); len(logged) != 1 {
		t.Errorf("log: %q", logged)
	}

	// Names: a folder takes a name a file import has, and the other way.
	if err := os.Mkdir(m.path("import", "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "create import/x over a folder", os.WriteFile(m.path("import", "x"), nil, 0o600), syscall.EISDIR)
	mustFail(t, "mkdir import/x again", os.Mkdir(m.path("import", "x"), 0o700), os.ErrExist)
	mustFail(t, "mkdir import/.x", os.Mkdir(m.path("import", ".x"), 0o700), syscall.EINVAL)
	mustFail(t, "unlink import/x", syscall.Unlink(m.path("import", "x")), syscall.EISDIR)
	if err := syscall.Rmdir(m.path("import", "x")); err != nil {
		t.Errorf("rmdir import/x: %v", err)
	}
	noLeftovers(t, m, staging)
}

// TestCrashRestoreFolder: kill -9 while a folder copied into import/ is
// restored (its qcow2 disk checked and about to be moved in, moved in,
// every file written but nothing committed) leaves no volume, and the
// restart sweeps the staging directory and the store; the restore then
// goes through.
func TestCrashRestoreFolder(t *testing.T) {
	for _, point := range []string{snapshot.PauseImportAdopting, snapshot.PauseRestoreConverting, snapshot.PauseRestoreWritten} {
		t.Run(point, func(t *testing.T) {
			w := newCrashWorld(t)
			// The folder of snapshot mid, as volumes/v/snapshots/mid
			// shows it: disk.qcow2 and meta.json.
			folder := filepath.Join(t.TempDir(), "mid")
			if err := os.Mkdir(folder, 0o700); err != nil {
				t.Fatal(err)
			}
			store, err := snapshot.OpenLocal(w.cfg.Store)
			if err != nil {
				t.Fatal(err)
			}
			meta, err := snapshot.VolumeSnapshotMetaFor(t.Context(), store, "v", "mid")
			if err != nil {
				t.Fatal(err)
			}
			qemutest.Img(t, "convert", "-O", "qcow2", snapshotPath(t, store, "v", "mid"), filepath.Join(folder, "disk.qcow2"))
			store.Close()
			data, err := json.Marshal(meta)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(folder, "meta.json"), data, 0o600); err != nil {
				t.Fatal(err)
			}
			restore := func(mnt string) error {
				if out, err := run("cp", "-r", folder, filepath.Join(mnt, "import", "restored")); err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			}
			ref := w.refs["volumes/v/snapshots/mid/disk.raw"]
			crash(t, w, point, restore, "volumes/restored/head.raw", ref)
			if _, err := os.Stat(filepath.Join(w.cfg.Mountpoint, "volumes/restored")); !os.IsNotExist(err) {
				t.Errorf("volumes/restored after a restore killed before its commit: %v", err)
			}
			if err := restore(w.cfg.Mountpoint); err != nil {
				t.Fatalf("restore after restart: %v", err)
			}
			sameContent(t, filepath.Join(w.cfg.Mountpoint, "volumes/restored/snapshots/mid/disk.raw"), ref)
		})
	}
}
