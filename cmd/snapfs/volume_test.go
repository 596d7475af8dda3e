package main

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// decode parses the --json output of a command into v.
func decode(t *testing.T, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
}

// TestStoreCommands walks the store commands as a script would: volumes,
// snapshots, instances, import, with --json, judged by qemu-img.
func TestStoreCommands(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	dir := t.TempDir()
	st := "--store=" + store

	var vol snapshot.Volume
	decode(t, mustSucceed(t, "volume", "create", st, "--json", "vm", "4M"), &vol)
	if vol.Name != "vm" || vol.Size != 4<<20 || vol.HeadPath == "" {
		t.Fatalf("created %+v", vol)
	}
	if fi, err := os.Stat(store); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("store directory: %v %v", fi.Mode(), err)
	}
	qemutest.IO(t, vol.HeadPath, "write -P 0x11 0 1M")
	before := qemutest.ConvertRaw(t, vol.HeadPath)

	var snap snapshot.Snapshot
	decode(t, mustSucceed(t, "snapshot", "create", st, "--json", "--meta", "reason=test", "vm@s1"), &snap)
	if snap.Name != "s1" || snap.Volume != "vm" || snap.Metadata["reason"] != "test" {
		t.Fatalf("snapshot %+v", snap)
	}
	if got := qemutest.ConvertRaw(t, snap.Path); string(got) != string(before) {
		t.Fatal("the snapshot layer does not read as the head did")
	}
	var vols []snapshot.VolumeInfo
	decode(t, mustSucceed(t, "volume", "list", st, "--json"), &vols)
	if len(vols) != 1 || len(vols[0].Chain) != 2 || !slices.Equal(vols[0].Snapshots, []string{"s1"}) || vols[0].Latest != "s1" {
		t.Fatalf("volumes %+v", vols)
	}
	qemutest.IO(t, vols[0].HeadPath, "write -P 0x22 512k 1M")
	out := mustSucceed(t, "snapshot", "create", st, "vm", "s2")
	if !strings.Contains(out, "vm@s2") {
		t.Errorf("snapshot create says %q", out)
	}
	var snaps []snapshot.Snapshot
	decode(t, mustSucceed(t, "snapshot", "list", st, "--json", "vm"), &snaps)
	if len(snaps) != 2 || snaps[1].Parent != "s1" {
		t.Fatalf("snapshots %+v", snaps)
	}
	s2 := qemutest.ConvertRaw(t, snaps[1].Path)
	mustDeleteJSON(t, map[string]any{"volume": "vm", "name": "s1", "deleted": true}, "snapshot", "delete", st, "--json", "vm@s1")
	decode(t, mustSucceed(t, "snapshot", "list", st, "--json"), &snaps)
	if len(snaps) != 1 || snaps[0].Name != "s2" {
		t.Fatalf("after delete: %+v", snaps)
	}
	if got := qemutest.ConvertRaw(t, snaps[0].Path); string(got) != string(s2) {
		t.Fatal("s2 reads differently after s1 was deleted")
	}
	text := mustSucceed(t, "snapshot", "list", st)
	if !strings.Contains(text, "vm@s2") || !strings.Contains(text, "crash-consistent") {
		t.Errorf("snapshot list:\n%s", text)
	}

	// Import: raw and qcow2, detected by content.
	raw := filepath.Join(dir, "disk.img")
	qemutest.Create(t, "raw", raw, "3M")
	qemutest.IO(t, raw, "write -P 0x33 1M 64k")
	decode(t, mustSucceed(t, "volume", "import", st, "--json", "--meta", "from=raw", raw, "imported"), &vol)
	qemutest.Compare(t, vol.HeadPath, raw)
	if vol.Metadata["from"] != "raw" {
		t.Errorf("imported %+v", vol)
	}
	bad := qemutest.Create(t, "qcow2", filepath.Join(dir, "bad.qcow2"), "1M", "-u", "-b", "/etc/passwd", "-F", "raw")
	mustFailWith(t, []string{"volume", "import", st, bad, "bad"}, bad, `backing file ("/etc/passwd")`, "flatten it first")
	mustFailWith(t, []string{"volume", "import", st, raw, "imported"}, "already exists")

	// Instances.
	mustSucceed(t, "volume", "create", st, "data", "1M")
	mustFailWith(t, []string{"instance", "create", st, "inst"}, "--disk")
	mustFailWith(t, []string{"instance", "create", st, "inst", "--disk", "vda"}, "DEVICE=VOLUME")
	mustFailWith(t, []string{"instance", "create", st, "inst", "--disk", "vda=nope"}, "not found", "nope")
	var in snapshot.Instance
	decode(t, mustSucceed(t, "instance", "create", st, "--json", "inst", "--disk", "vda=vm", "--disk", "vdb=data"), &in)
	if !slices.Equal(in.Disks, []snapshot.Disk{{Device: "vda", Volume: "vm"}, {Device: "vdb", Volume: "data"}}) {
		t.Fatalf("instance %+v", in)
	}
	var isnap snapshot.InstanceSnapshot
	decode(t, mustSucceed(t, "instance", "snapshot", st, "--json", "inst", "backup1"), &isnap)
	if isnap.Consistency != snapshot.CrashConsistent || len(isnap.Disks) != 2 {
		t.Fatalf("instance snapshot %+v", isnap)
	}
	var listing []struct {
		Name      string                      `json:"name"`
		Snapshots []snapshot.InstanceSnapshot `json:"snapshots"`
	}
	decode(t, mustSucceed(t, "instance", "list", st, "--json"), &listing)
	if len(listing) != 1 || len(listing[0].Snapshots) != 1 {
		t.Fatalf("instance list %+v", listing)
	}
	mustFailWith(t, []string{"snapshot", "delete", st, "data@backup1"}, "instance snapshot inst/backup1")
	mustFailWith(t, []string{"volume", "delete", st, "data"}, "instance inst")
	mustDeleteJSON(t, map[string]any{"instance": "inst", "name": "backup1", "deleted": true}, "instance", "delete-snapshot", st, "--json", "inst", "backup1")
	mustDeleteJSON(t, map[string]any{"name": "inst", "deleted": true}, "instance", "delete", st, "--json", "inst")
	mustDeleteJSON(t, map[string]any{"name": "data", "deleted": true}, "volume", "delete", st, "--json", "data")
	mustFailWith(t, []string{"volume", "delete", st, "data"}, "not found")
	decode(t, mustSucceed(t, "volume", "list", st, "--json"), &vols)
	if len(vols) != 2 {
		t.Fatalf("volumes left: %+v", vols)
	}
}

// mustDeleteJSON runs a delete command with --json and checks the one
// document it prints: what is gone, under the keys of its own JSON.
func mustDeleteJSON(t *testing.T, want map[string]any, args ...string) {
	t.Helper()
	var got map[string]any
	decode(t, mustSucceed(t, args...), &got)
	if !maps.Equal(got, want) {
		t.Errorf("snapfs %s printed %v, want %v", strings.Join(args, " "), got, want)
	}
}

func TestStoreUsageErrors(t *testing.T) {
	st := "--store=" + filepath.Join(t.TempDir(), "store")
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"volume", "create", st, "v"}, []string{"usage: snapfs volume create"}},
		{[]string{"volume", "create", st, "v", "ten"}, []string{`size "ten"`}},
		{[]string{"volume", "create", st, "a/b", "1M"}, []string{"invalid name", "a/b"}},
		{[]string{"volume", "create", st, "v", "0"}, []string{"size 0"}},
		{[]string{"snapshot", "create", st, "novolume"}, []string{"usage: snapfs snapshot create"}},
		{[]string{"snapshot", "create", st, "nope@s"}, []string{"not found", "nope"}},
		{[]string{"snapshot", "create", st, "--meta", "novalue", "v@s"}, []string{"KEY=VALUE"}},
		{[]string{"volume", "import", st, "/nonexistent.img", "x"}, []string{"/nonexistent.img", "no such file"}},
	} {
		t.Run(strings.Join(tc.args[2:], " "), func(t *testing.T) {
			mustFailWith(t, tc.args, tc.want...)
		})
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"4096", 4096}, {"1k", 1024}, {"1K", 1024}, {"10M", 10 << 20}, {"10MiB", 10 << 20}, {"2G", 2 << 30},
		{"2GB", 2 << 30}, {"1.5G", 3 << 29}, {"1T", 1 << 40}, {"64T", 64 << 40}, {"1P", 1 << 50},
	} {
		if got, err := parseSize(tc.in); err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "G", "B", "iB", "-1", "1X", "abc", "NaN", "1e30", "9E"} {
		if got, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", bad, got)
		}
	}
}

// TestCloneCommands: clone, the clones that block a delete (named in the
// error and in snapshot list), flatten, revert, as a script would use them.
func TestCloneCommands(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	st := "--store=" + store
	var vol snapshot.Volume
	decode(t, mustSucceed(t, "volume", "create", st, "--json", "vm", "4M"), &vol)
	qemutest.IO(t, vol.HeadPath, "write -P 0x11 0 1M")
	var snap snapshot.Snapshot
	decode(t, mustSucceed(t, "snapshot", "create", st, "--json", "vm@s1"), &snap)

	var kid snapshot.Volume
	decode(t, mustSucceed(t, "volume", "clone", st, "--json", "vm@s1", "kid"), &kid)
	if kid.Parent == nil || *kid.Parent != (snapshot.SnapshotRef{Volume: "vm", Snapshot: "s1"}) {
		t.Fatalf("clone %+v", kid)
	}
	qemutest.Compare(t, kid.HeadPath, snap.Path)
	if out := mustSucceed(t, "volume", "clone", st, "vm", "s1", "kid2"); !strings.Contains(out, "volume kid2") {
		t.Errorf("clone says %q", out)
	}
	qemutest.IO(t, kid.HeadPath, "write -P 0x22 512k 64k")
	kidBefore := qemutest.ConvertRaw(t, kid.HeadPath)

	mustFailWith(t, []string{"snapshot", "delete", st, "vm@s1"}, "has clones (kid, kid2)", "flatten")
	mustFailWith(t, []string{"volume", "delete", st, "vm"}, "has clones (kid, kid2)")
	if out := mustSucceed(t, "snapshot", "list", st, "vm"); !strings.Contains(out, "CLONES") || !strings.Contains(out, "kid,kid2") {
		t.Errorf("snapshot list does not show the clones:\n%s", out)
	}
	if out := mustSucceed(t, "volume", "list", st); !strings.Contains(out, "vm@s1") {
		t.Errorf("volume list does not show the parent:\n%s", out)
	}
	mustFailWith(t, []string{"volume", "clone", st, "vm@nope", "x"}, "not found", "nope")
	mustFailWith(t, []string{"volume", "clone", st, "vm@s1"}, "usage: snapfs volume clone")

	// Flatten: the clone reads the same, the parent is free.
	if out := mustSucceed(t, "volume", "flatten", st, "kid"); out != "" {
		t.Errorf("flatten printed %q", out)
	}
	decode(t, mustSucceed(t, "volume", "flatten", st, "--json", "kid2"), &vol)
	if vol.Parent != nil || vol.Flatten != nil {
		t.Errorf("after flatten: %+v", vol)
	}
	if got := qemutest.ConvertRaw(t, kid.HeadPath); string(got) != string(kidBefore) {
		t.Error("the flattened clone reads differently")
	}
	for _, info := range qemutest.ImgInfoChain(t, kid.HeadPath) {
		if filepath.Join(filepath.Dir(kid.HeadPath), info.BackingFilename) == snap.Path {
			t.Error("the flattened clone still reads the parent's layer")
		}
	}
	mustFailWith(t, []string{"volume", "flatten", st, "nope"}, "not found")

	// Revert: the head reads as the snapshot again; snapshots stay.
	qemutest.IO(t, vol.HeadPath, "write -P 0x33 0 4M")
	decode(t, mustSucceed(t, "snapshot", "create", st, "--json", "kid2@k1"), &snap)
	qemutest.IO(t, headOf(t, st, "kid2"), "write -P 0x44 0 2M")
	mustSucceed(t, "volume", "revert", st, "kid2", "k1")
	qemutest.Compare(t, headOf(t, st, "kid2"), snap.Path)
	mustSucceed(t, "volume", "revert", st, "vm@s1")
	qemutest.Compare(t, headOf(t, st, "vm"), mustSnapshotPath(t, st, "vm", "s1"))
	mustFailWith(t, []string{"volume", "revert", st, "vm", "nope"}, "not found", "nope")
	// Without --json a delete that worked says nothing.
	if out := mustSucceed(t, "volume", "delete", st, "kid"); out != "" {
		t.Errorf("volume delete printed %q", out)
	}
	if out := mustSucceed(t, "snapshot", "delete", st, "vm@s1"); out != "" {
		t.Errorf("snapshot delete printed %q", out)
	}
}

// headOf returns the head path of a volume, as volume list says.
func headOf(t *testing.T, st, name string) string {
	t.Helper()
	var vols []snapshot.Volume
	decode(t, mustSucceed(t, "volume", "list", st, "--json"), &vols)
	for _, v := range vols {
		if v.Name == name {
			return v.HeadPath
		}
	}
	t.Fatalf("no volume %s", name)
	return ""
}

// mustSnapshotPath returns the layer file of a snapshot, as snapshot list
// says.
func mustSnapshotPath(t *testing.T, st, vol, snap string) string {
	t.Helper()
	var snaps []snapshot.Snapshot
	decode(t, mustSucceed(t, "snapshot", "list", st, "--json", vol), &snaps)
	for _, s := range snaps {
		if s.Name == snap {
			return s.Path
		}
	}
	t.Fatalf("no snapshot %s@%s", vol, snap)
	return ""
}

// TestRestoreCommands: folders written as the mount serves them (meta.json
// and the disk exports) restore with volume restore and instance restore.
func TestRestoreCommands(t *testing.T) {
	ctx := context.Background()
	store := filepath.Join(t.TempDir(), "store")
	st := "--store=" + store
	src := filepath.Join(t.TempDir(), "src.raw")
	qemutest.Create(t, "raw", src, "3M")
	qemutest.IO(t, src, "write -P 0x55 1M 64k")
	var vol snapshot.Volume
	decode(t, mustSucceed(t, "volume", "import", st, "--json", "--meta", "os=debian", src, "root"), &vol)
	mustSucceed(t, "volume", "create", st, "data", "1M")
	mustSucceed(t, "instance", "create", st, "web", "--disk", "vda=root", "--disk", "vdb=data")
	mustSucceed(t, "instance", "snapshot", st, "--meta", "why=backup", "web", "nightly")

	// What cp -r of the mount's folders gives.
	s, err := snapshot.OpenLocal(store)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	backup := t.TempDir()
	idir := filepath.Join(backup, "nightly")
	imeta, err := snapshot.InstanceSnapshotMetaFor(ctx, s, s, "web", "nightly")
	if err != nil {
		t.Fatal(err)
	}
	writeMeta(t, filepath.Join(idir, "meta.json"), imeta)
	for _, d := range imeta.Disks {
		writeFullExport(t, s, d.Volume, d.Snapshot, filepath.Join(idir, d.Device+".qcow2"))
	}
	vdir := filepath.Join(backup, "root-nightly")
	vmeta, err := snapshot.VolumeSnapshotMetaFor(ctx, s, "root", "nightly")
	if err != nil {
		t.Fatal(err)
	}
	writeMeta(t, filepath.Join(vdir, "meta.json"), vmeta)
	writeFullExport(t, s, "root", "nightly", filepath.Join(vdir, "disk.qcow2"))

	out := mustSucceed(t, "instance", "restore", st, idir)
	if !strings.Contains(out, "instance web-restored: vda=web-restored-vda vdb=web-restored-vdb") {
		t.Errorf("instance restore says %q", out)
	}
	qemutest.Compare(t, headOf(t, st, "web-restored-vda"), src)
	var in snapshot.Instance
	decode(t, mustSucceed(t, "instance", "restore", st, "--json", idir, "copy"), &in)
	if in.Name != "copy" || len(in.Disks) != 2 || in.Disks[1].Device != "vdb" {
		t.Errorf("restored %+v", in)
	}
	mustFailWith(t, []string{"instance", "restore", st, idir, "copy"}, "already exists")
	mustFailWith(t, []string{"instance", "restore", st, vdir}, "volume-snapshot")

	decode(t, mustSucceed(t, "volume", "restore", st, "--json", vdir), &vol)
	if vol.Name != "root-restored" || vol.Metadata["os"] != "debian" {
		t.Errorf("restored %+v", vol)
	}
	qemutest.Compare(t, vol.HeadPath, src)
	out = mustSucceed(t, "volume", "restore", st, filepath.Join(vdir, "disk.qcow2"), "again")
	if !strings.Contains(out, "volume again:") || !strings.Contains(out, "snapshot nightly") {
		t.Errorf("volume restore says %q", out)
	}
	mustFailWith(t, []string{"volume", "restore", st, idir}, "instance restore")
	mustFailWith(t, []string{"volume", "restore", st, src}, "no meta.json beside it", "volume import")
}

func writeMeta(t *testing.T, path string, v any) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeFullExport(t *testing.T, s *snapshot.LocalStore, vol, snap, path string) {
	t.Helper()
	x, err := snapshot.FullExport(context.Background(), s, vol, snap)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, io.NewSectionReader(x, 0, x.Size())); err != nil {
		t.Fatal(err)
	}
}
