package fs

import (
	"io"
	"os"
	"testing"

	"snapfs/snapshot/backendtest"
)

// BenchmarkCloneReadMount is issue 4's clone read benchmark through a
// mount: head.raw of a flat volume and of a clone 16 deep holding the same
// data (snapshot's BenchmarkCloneRead has the layouts), read whole in
// 1 MiB pieces, with the layer files in the page cache; it reports the
// best MB/s of each and the ratio depth16/depth1 (the target: 0.9 or
// more). head.raw is never cached by the kernel: every read goes through
// snapfs and down the chain.
func BenchmarkCloneReadMount(b *testing.B) {
	const size, levels = 256 << 20, 16
	for _, layout := range []string{"striped", "interleaved"} {
		b.Run(layout, func(b *testing.B) {
			store := newStore(b)
			deep := backendtest.CloneChain(b, store, size, levels, backendtest.CloneLayout(layout, size, levels))
			m := testMount(b, store)
			files := [2]string{m.path("volumes", "flat", "head.raw"), m.path("volumes", deep, "head.raw")}
			backendtest.CompareReads(b, size, [2]string{"depth1", "depth16"}, func(i int) (io.ReaderAt, func()) {
				f, err := os.Open(files[i])
				if err != nil {
					b.Fatal(err)
				}
				return f, func() { f.Close() }
			})
		})
	}
}
