package backendtest

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// ClusterSize is the unit in which CloneChain's owner function spreads the
// data over the levels: the clusters of the store's layers.
const ClusterSize = 64 << 10

// CloneLayout returns the owner function of a CloneChain of size bytes
// and levels levels: "striped" gives level k the k-th of levels equal
// parts of the disk, as clones that each change their own part; any other
// layout ("interleaved") gives level k every levels-th cluster, the worst
// case, where every read of a few clusters needs every level.
func CloneLayout(layout string, size int64, levels int) func(cluster int64) int {
	if layout == "striped" {
		return func(c int64) int { return int(c * int64(levels) / (size / ClusterSize)) }
	}
	return func(c int64) int { return int(c % int64(levels)) }
}

// CloneChain makes, in a local store, the volumes of issue 4's clone read
// benchmark: "flat", size bytes in one layer, and a chain of clones 16 (or
// levels) deep holding the same data: c0 is a volume, and ck is a clone of
// c(k-1)@s, each writing the clusters that owner gives to its level (with
// the pattern level+1) before its snapshot s. It returns the deepest
// clone, whose head reads through levels layers and more.
func CloneChain(t testing.TB, store *snapshot.LocalStore, size int64, levels int, owner func(cluster int64) int) string {
	t.Helper()
	ctx := context.Background()
	// Runs of clusters with one owner are written by one command each.
	clusters := size / ClusterSize
	var flat []string
	perLevel := make([][]string, levels)
	for c := int64(0); c < clusters; {
		end := c + 1
		for end < clusters && owner(end) == owner(c) {
			end++
		}
		cmd := fmt.Sprintf("write -P %d %d %d", owner(c)+1, c*ClusterSize, (end-c)*ClusterSize)
		flat = append(flat, cmd)
		perLevel[owner(c)] = append(perLevel[owner(c)], cmd)
		c = end
	}
	head := func(name string) string {
		v, err := store.Volume(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return v.HeadPath
	}
	if _, err := store.CreateVolume(ctx, "flat", size); err != nil {
		t.Fatal(err)
	}
	qemutest.IO(t, head("flat"), flat...)
	parent := ""
	for k := range levels {
		name := fmt.Sprintf("c%d", k)
		var err error
		if parent == "" {
			_, err = store.CreateVolume(ctx, name, size)
		} else {
			_, err = store.Clone(ctx, parent, "s", name)
		}
		if err != nil {
			t.Fatal(err)
		}
		qemutest.IO(t, head(name), perLevel[k]...)
		if _, err := store.CreateSnapshots(ctx, []string{name}, "s", snapshot.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		parent = name
	}
	if v, err := store.Volume(ctx, parent); err != nil || len(v.Chain) != levels+1 {
		t.Fatalf("the deepest clone %s reads through %d layers (%v), want %d", parent, len(v.Chain), err, levels+1)
	}
	return parent
}

// CompareReads reads two images of the same size and content whole, in
// 1 MiB pieces as the mount's readers do, b.N times each in turns, and
// reports the best rate of each (noise only ever slows a read down) and
// their ratio, as the metrics names[0]-MB/s, names[1]-MB/s and
// names[1]/names[0]. open opens image i for one read; its close function
// is called after it. The first read of each is compared, cluster by
// cluster, with the other's, and is not timed.
func CompareReads(b *testing.B, size int64, names [2]string, open func(i int) (io.ReaderAt, func())) {
	b.Helper()
	read := func(i int, sum []byte) float64 {
		r, closeImage := open(i)
		defer closeImage()
		buf := make([]byte, 1<<20)
		start := time.Now()
		for off := int64(0); off < size; off += int64(len(buf)) {
			n := min(int64(len(buf)), size-off)
			if _, err := r.ReadAt(buf[:n], off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
			if sum != nil {
				for k := int64(0); k < n; k += ClusterSize {
					sum[(off+k)/ClusterSize] = buf[k]
				}
			}
		}
		return float64(size) / 1e6 / time.Since(start).Seconds()
	}
	sums := [2][]byte{make([]byte, size/ClusterSize), make([]byte, size/ClusterSize)}
	read(0, sums[0])
	read(1, sums[1])
	if string(sums[0]) != string(sums[1]) {
		b.Fatalf("%s and %s read differently", names[0], names[1])
	}
	b.ResetTimer()
	var best [2]float64
	for n := range b.N {
		for k := range 2 {
			i := (n + k) % 2 // in turns: neither always goes first
			best[i] = max(best[i], read(i, nil))
		}
	}
	b.ReportMetric(best[0], names[0]+"-MB/s")
	b.ReportMetric(best[1], names[1]+"-MB/s")
	b.ReportMetric(best[1]/best[0], names[1]+"/"+names[0])
	b.SetBytes(2 * size)
}
