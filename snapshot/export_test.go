package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// writeExport writes the bytes of an export to path, as a reader of the
// mount's file would get them, and closes the export.
func writeExport(t *testing.T, x *Export, err error, path string) {
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

// writeSnapshotsTree writes what volumes/VOL/snapshots/ serves for the
// qcow2 exports: S/disk.qcow2 for every snapshot, S2/since/S1.qcow2 for
// every pair.
func writeSnapshotsTree(t *testing.T, s *LocalStore, vol, dir string) {
	t.Helper()
	ctx := context.Background()
	snaps, err := s.ListSnapshots(ctx, vol)
	if err != nil {
		t.Fatal(err)
	}
	for i, to := range snaps {
		x, err := FullExport(ctx, s, vol, to.Name)
		writeExport(t, x, err, filepath.Join(dir, to.Name, "disk.qcow2"))
		for _, from := range snaps[:i] {
			x, err := IncrementalExport(ctx, s, vol, from.Name, to.Name)
			writeExport(t, x, err, filepath.Join(dir, to.Name, "since", from.Name+".qcow2"))
		}
	}
}

// TestIncrementalExport: since/S1.qcow2 overlays hold exactly what changed
// (data, and zero clusters where data became zero), name their backing
// file relative to the copied tree, pass qemu-img check, flatten to
// exactly S2 wherever the tree is copied (rsync -a), and are as big as the
// change, not as the volume.
func TestIncrementalExport(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "v", 64<<20)
	writeHead(t, s, "v", "write -P 1 0 16M", "write -P 2 32M 8M")
	mustSnapshot(t, s, "v", "s1")
	// 128 KiB of new data, 64 KiB rewritten, 64 KiB zeroed that was data,
	// and 1 MiB zeroed that was zeros already (not a change).
	writeHead(t, s, "v", "write -P 3 20M 128k", "write -P 4 1M 64k", "write -z 2M 64k", "write -z 50M 1M")
	mustSnapshot(t, s, "v", "s2")
	writeHead(t, s, "v", "write -P 5 33M 64k", "write -z 20M 64k")
	mustSnapshot(t, s, "v", "s3 with space")

	got, err := s.Changed(ctx, "v", "s1", "s2")
	if err != nil {
		t.Fatal(err)
	}
	want := []qcow.Extent{
		{Offset: 1 << 20, Length: 64 << 10, Kind: qcow.Data},
		{Offset: 2 << 20, Length: 64 << 10, Kind: qcow.Zero},
		{Offset: 20 << 20, Length: 128 << 10, Kind: qcow.Data},
	}
	if !slices.Equal(got, want) {
		t.Errorf("Changed(s1, s2) = %+v\nwant %+v", got, want)
	}

	tree := filepath.Join(t.TempDir(), "snapshots")
	writeSnapshotsTree(t, s, "v", tree)
	since := filepath.Join(tree, "s2", "since", "s1.qcow2")
	info := qemutest.ImgInfo(t, since)
	if info.BackingFilename != "../../s1/disk.qcow2" || info.BackingFormat != "qcow2" || info.ClusterSize != ExportClusterSize {
		t.Errorf("since file: backing %q (%s), cluster size %d", info.BackingFilename, info.BackingFormat, info.ClusterSize)
	}
	// Exactly the changed clusters, as qemu maps the top layer.
	var data, zero int64
	for _, e := range qemutest.Map(t, since) {
		if e.Depth != 0 || !e.Present {
			continue
		}
		if e.Data {
			data += e.Length
		} else if e.Zero {
			zero += e.Length
		}
	}
	if data != 192<<10 || zero != 64<<10 {
		t.Errorf("since/s1.qcow2 holds %d bytes of data and %d of zero clusters; want %d and %d", data, zero, 192<<10, 64<<10)
	}
	// Proportional to the change: header, tables and 192 KiB of data,
	// for a 64 MiB volume with 24 MiB of data.
	if fi, err := os.Stat(since); err != nil || fi.Size() > 1<<20 {
		t.Errorf("since/s1.qcow2 is %d bytes (%v)", fi.Size(), err)
	}

	// A copy of the tree (rsync -a, as a backup would) is a valid chain
	// wherever it lands: every file checks, and each flattens to exactly
	// its snapshot, read by qemu-img from the store's own files.
	copied := filepath.Join(t.TempDir(), "backup")
	if out, err := exec.Command("rsync", "-a", tree+"/", copied+"/").CombinedOutput(); err != nil {
		t.Fatalf("rsync: %v: %s", err, out)
	}
	for _, c := range []struct{ file, snap string }{
		{"s1/disk.qcow2", "s1"},
		{"s2/disk.qcow2", "s2"},
		{"s2/since/s1.qcow2", "s2"},
		{"s3 with space/since/s1.qcow2", "s3 with space"},
		{"s3 with space/since/s2.qcow2", "s3 with space"},
	} {
		path := filepath.Join(copied, c.file)
		qemutest.Check(t, path)
		qemutest.Compare(t, path, snapshotPath(t, s, "v", c.snap))
		img, err := s.OpenSnapshot(ctx, "v", c.snap)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(qemutest.ConvertRaw(t, path), readImage(t, img)) {
			t.Errorf("%s flattened by qemu-img differs from %s", c.file, c.snap)
		}
	}

	// The same export twice is the same bytes (rsync then sends nothing).
	again := filepath.Join(t.TempDir(), "again.qcow2")
	x, err := IncrementalExport(ctx, s, "v", "s1", "s2")
	writeExport(t, x, err, again)
	a, _ := os.ReadFile(since)
	b, _ := os.ReadFile(again)
	if !bytes.Equal(a, b) {
		t.Error("two incremental exports of the same snapshots differ")
	}

	// After s2 is deleted (merged into s3), s3 since s1 still flattens to
	// s3, and still holds only what changed.
	if err := s.DeleteSnapshot(ctx, "v", "s2"); err != nil {
		t.Fatal(err)
	}
	after := filepath.Join(tree, "s3 with space", "since", "s1-after.qcow2")
	x, err = IncrementalExport(ctx, s, "v", "s1", "s3 with space")
	writeExport(t, x, err, after)
	qemutest.Check(t, after)
	qemutest.Compare(t, after, snapshotPath(t, s, "v", "s3 with space"))
	if x.DataBytes() > 320<<10 {
		t.Errorf("after the merge, s3 since s1 holds %d bytes of data", x.DataBytes())
	}

	if _, err := IncrementalExport(ctx, s, "v", "s3 with space", "s1"); err == nil {
		t.Error("an incremental export backwards was made")
	}
	if _, err := IncrementalExport(ctx, s, "v", "s1", "s1"); err == nil {
		t.Error("an incremental export of a snapshot since itself was made")
	}
}

// TestRefineChanged: comparing the candidates finds exactly the clusters
// that differ, even when the candidates are the whole disk, as a coarse
// diff may say.
func TestRefineChanged(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mustVolume(t, s, "v", 8<<20)
	writeHead(t, s, "v", "write -P 1 0 4M")
	mustSnapshot(t, s, "v", "a")
	// Rewritten with the same bytes: no change; zeroed: Zero; new: Data.
	writeHead(t, s, "v", "write -P 1 0 1M", "write -z 1M 128k", "write -P 9 6M 100k")
	mustSnapshot(t, s, "v", "b")
	from, err := s.OpenSnapshot(ctx, "v", "a")
	if err != nil {
		t.Fatal(err)
	}
	defer from.Close()
	to, err := s.OpenSnapshot(ctx, "v", "b")
	if err != nil {
		t.Fatal(err)
	}
	defer to.Close()
	whole := []qcow.Extent{{Offset: 0, Length: 8 << 20, Kind: qcow.Data}}
	got, err := RefineChanged(ctx, from, to, whole, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []qcow.Extent{
		{Offset: 1 << 20, Length: 128 << 10, Kind: qcow.Zero},
		{Offset: 6 << 20, Length: 128 << 10, Kind: qcow.Data}, // 100k, in whole clusters
	}
	if !slices.Equal(got, want) {
		t.Errorf("RefineChanged = %+v\nwant %+v", got, want)
	}
	// The allocation-based answer includes the identical rewrite.
	changed, err := s.Changed(ctx, "v", "a", "b")
	if err != nil {
		t.Fatal(err)
	}
	if len(changed) == 0 || changed[0].Offset != 0 || changed[0].Kind != qcow.Data {
		t.Errorf("Changed(a, b) = %+v", changed)
	}
	refined, err := RefineChanged(ctx, from, to, changed, 0)
	if err != nil || !slices.Equal(refined, want) {
		t.Errorf("RefineChanged(Changed) = %+v, %v", refined, err)
	}
}

// countingBackend counts the guest bytes read from the images it opens.
type countingBackend struct {
	Backend
	read *atomic.Int64
}

func (c countingBackend) OpenSnapshot(ctx context.Context, volume, name string) (qcow.Image, error) {
	img, err := c.Backend.OpenSnapshot(ctx, volume, name)
	if err != nil {
		return nil, err
	}
	return countingImage{Image: img, read: c.read}, nil
}

type countingImage struct {
	qcow.Image
	read *atomic.Int64
}

func (c countingImage) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.Image.ReadAt(p, off)
	c.read.Add(int64(n))
	return n, err
}

// BenchmarkIncrementalExport reads the whole since/S1.qcow2 of a volume
// (1 GiB of data, SNAPFS_BENCH_GIB to change it: issue 4 names 10) of which
// 1% changed between S1 and S2, in scattered 64 KiB clusters. It reports
// the guest bytes read from the store per byte changed (issue 4: about 1),
// the size of the export per byte changed, and the export's read rate.
func BenchmarkIncrementalExport(b *testing.B) {
	gib := int64(1)
	if v := os.Getenv("SNAPFS_BENCH_GIB"); v != "" {
		if _, err := fmt.Sscan(v, &gib); err != nil || gib <= 0 {
			b.Fatalf("SNAPFS_BENCH_GIB=%q: want a number of GiB", v)
		}
	}
	size := gib << 30
	ctx := context.Background()
	s, err := OpenLocal(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if _, err := s.CreateVolume(ctx, "v", size); err != nil {
		b.Fatal(err)
	}
	qemutest.IO(b, s.layerPath(mustHead(b, s, "v")), fmt.Sprintf("write -P 1 0 %d", size))
	if _, err := s.CreateSnapshots(ctx, []string{"v"}, "s1", SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	// 1% of the clusters, spread evenly over the disk.
	clusters := size >> 16
	var cmds []string
	changed := int64(0)
	for c := int64(0); c < clusters; c += 100 {
		cmds = append(cmds, fmt.Sprintf("write -P 2 %d 64k", c<<16))
		changed += 64 << 10
	}
	qemutest.IO(b, s.layerPath(mustHead(b, s, "v")), cmds...)
	if _, err := s.CreateSnapshots(ctx, []string{"v"}, "s2", SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	var read atomic.Int64
	cb := countingBackend{Backend: s, read: &read}
	buf := make([]byte, 1<<20)
	var exportSize int64
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		x, err := IncrementalExport(ctx, cb, "v", "s1", "s2")
		if err != nil {
			b.Fatal(err)
		}
		exportSize = x.Size()
		for off := int64(0); off < x.Size(); off += int64(len(buf)) {
			if _, err := x.ReadAt(buf, off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
		}
		x.Close()
	}
	elapsed := time.Since(start)
	b.ReportMetric(float64(read.Load())/float64(b.N)/float64(changed), "read/changed")
	b.ReportMetric(float64(exportSize)/float64(changed), "size/changed")
	b.ReportMetric(float64(exportSize)*float64(b.N)/1e6/elapsed.Seconds(), "export-MB/s")
}
