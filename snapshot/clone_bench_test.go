package snapshot_test

import (
	"context"
	"io"
	"testing"

	"snapfs/snapshot"
	"snapfs/snapshot/backendtest"
)

// BenchmarkCloneRead reads the head of a volume whose data is all in one
// layer (depth 1) and the head of a clone 16 deep holding the same data
// spread over its 16 levels, through LocalStore.OpenHead, and reports the
// best MB/s of each and the ratio depth16/depth1 (issue 4 wants 0.9 or
// more). fs's BenchmarkCloneReadMount reads the same through a mount.
//
//   - striped: level k wrote the k-th sixteenth of the disk, as clones that
//     each change their own part do; a read walks down the chain to the
//     one layer that holds its range.
//   - interleaved: level k wrote every 16th 64 KiB cluster, the worst
//     case: every 1 MiB read is 16 reads of 64 KiB from 16 files, where the
//     flat volume's is one.
func BenchmarkCloneRead(b *testing.B) {
	const size, levels = 64 << 20, 16
	for _, layout := range []string{"striped", "interleaved"} {
		b.Run(layout, func(b *testing.B) {
			s, err := snapshot.OpenLocal(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			deep := backendtest.CloneChain(b, s, size, levels, backendtest.CloneLayout(layout, size, levels))
			volumes := [2]string{"flat", deep}
			backendtest.CompareReads(b, size, [2]string{"depth1", "depth16"}, func(i int) (io.ReaderAt, func()) {
				img, err := s.OpenHead(context.Background(), volumes[i])
				if err != nil {
					b.Fatal(err)
				}
				return img, func() { img.Close() }
			})
		})
	}
}
