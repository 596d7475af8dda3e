package qcow_test

import (
	"fmt"
	"path/filepath"
	"testing"

	"snapfs/internal/qemutest"
)

// BenchmarkChainDepth reads the same 256 MiB through chains of different
// depth: the data is spread evenly over the layers, so a deep chain reads
// each range from a different layer. Compare the MB/s of the sub-benchmarks.
func BenchmarkChainDepth(b *testing.B) {
	const size = 256 << 20
	for _, depth := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			dir := b.TempDir()
			prev := ""
			var top string
			for i := 0; i < depth; i++ {
				top = filepath.Join(dir, fmt.Sprintf("l%d.qcow2", i))
				opts := []string{}
				if prev != "" {
					opts = append(opts, "-b", filepath.Base(prev), "-F", "qcow2")
				}
				qemutest.Create(b, "qcow2", top, "256M", opts...)
				// Layer i holds every depth-th MiB from i on.
				var cmds []string
				for off := i; off < size>>20; off += depth {
					cmds = append(cmds, fmt.Sprintf("write -P %d %dM 1M", i+1, off))
				}
				qemutest.IO(b, top, cmds...)
				prev = top
			}
			c := openChain(b, top)
			buf := make([]byte, 1<<20)
			b.SetBytes(size)
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				for off := int64(0); off < size; off += int64(len(buf)) {
					if _, err := c.ReadAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
