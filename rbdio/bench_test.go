//go:build ceph && cgo

package rbdio

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// BenchmarkReadChain reads a 64 MiB snapshot in 1 MiB reads, as the mount
// does, flat and at the end of a clone chain 8 deep whose objects are spread
// over the layers. The target: depth 8 within 10% of flat.
//
//	go test -tags ceph,pacific ./rbdio -run NONE -bench ReadChain
func BenchmarkReadChain(b *testing.B) {
	p, c := pool(), b.Context()
	const size = 64 << 20
	base := uniqueName(b, "bench-base")
	if _, err := p.CreateVolume(c, base, size); err != nil {
		b.Fatal(err)
	}
	defer p.DeleteVolume(c, base)
	w := writer(b, base)
	if _, err := w.WriteAt(randomBytes(size), 0); err != nil {
		b.Fatal(err)
	}
	w.Flush()
	w.Close()
	if _, err := p.CreateSnapshots(c, []string{base}, "s", snapshot.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	parent := base
	var chain []string
	for i := range 8 {
		name := uniqueName(b, fmt.Sprintf("bench-chain%d", i))
		if _, err := p.Clone(c, parent, "s", name); err != nil {
			b.Fatal(err)
		}
		chain = append(chain, name)
		w := writer(b, name)
		// Each clone takes two of the 16 objects.
		for _, obj := range []int{i, i + 8} {
			if _, err := w.WriteAt(randomBytes(4096), int64(obj)<<22); err != nil {
				b.Fatal(err)
			}
		}
		w.Flush()
		w.Close()
		if _, err := p.CreateSnapshots(c, []string{name}, "s", snapshot.SnapshotOptions{}); err != nil {
			b.Fatal(err)
		}
		parent = name
	}
	defer func() {
		for i := len(chain) - 1; i >= 0; i-- {
			p.DeleteVolume(c, chain[i])
		}
	}()
	// depth8-librbd reads the last clone's head, where librbd walks the
	// parents itself, for comparison.
	for _, tc := range []struct{ name, vol, snap string }{{"flat", base, "s"}, {"depth8", parent, "s"}, {"depth8-librbd", parent, ""}} {
		open := func(b *testing.B) qcow.Image {
			var im qcow.Image
			var err error
			if tc.snap != "" {
				im, err = p.OpenSnapshot(c, tc.vol, tc.snap)
			} else {
				im, err = p.OpenHead(c, tc.vol)
			}
			if err != nil {
				b.Fatal(err)
			}
			return im
		}
		b.Run(tc.name, func(b *testing.B) {
			im := open(b)
			defer im.Close()
			buf := make([]byte, 1<<20)
			b.SetBytes(size)
			for b.Loop() {
				readSequential(b, im, buf)
			}
		})
		// As the mount reads ahead: 2 MiB reads, 16 in flight.
		b.Run(tc.name+"-mount", func(b *testing.B) {
			im := open(b)
			defer im.Close()
			b.SetBytes(size)
			for b.Loop() {
				readParallel(b, im, 2<<20, 16)
			}
		})
	}
}

// readParallel reads im front to back in reads of n bytes, inFlight at a
// time.
func readParallel(b *testing.B, im qcow.Image, n, inFlight int) {
	var (
		wg   sync.WaitGroup
		next atomic.Int64
	)
	for range inFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, n)
			for {
				off := next.Add(int64(n)) - int64(n)
				if off >= im.Size() {
					return
				}
				if _, err := im.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func readSequential(b *testing.B, im qcow.Image, buf []byte) {
	for off := int64(0); off < im.Size(); off += int64(len(buf)) {
		if _, err := im.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReadSequential reads a 256 MiB snapshot front to back in
// requests of the sizes FUSE sends (128 KiB by default, 1 MiB with
// max_pages 256), one at a time: the case readahead is for. Compare with
// `rbd export IMAGE - >/dev/null` of the same image.
func BenchmarkReadSequential(b *testing.B) {
	p, c := pool(), b.Context()
	const size = 256 << 20
	name := uniqueName(b, "bench-seq")
	if _, err := p.CreateVolume(c, name, size); err != nil {
		b.Fatal(err)
	}
	defer p.DeleteVolume(c, name)
	w := writer(b, name)
	for off := int64(0); off < size; off += 16 << 20 {
		if _, err := w.WriteAt(randomBytes(16<<20), off); err != nil {
			b.Fatal(err)
		}
	}
	w.Flush()
	w.Close()
	if _, err := p.CreateSnapshots(c, []string{name}, "s", snapshot.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	for _, req := range []int{128 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dk", req>>10), func(b *testing.B) {
			im, err := p.OpenSnapshot(c, name, "s")
			if err != nil {
				b.Fatal(err)
			}
			defer im.Close()
			buf := make([]byte, req)
			b.SetBytes(size)
			for b.Loop() {
				readSequential(b, im, buf)
			}
		})
	}
}

// BenchmarkCreateSnapshot is the latency of mkdir of a snapshot: one
// CreateSnapshots on a volume with data (the size does not matter to RBD).
func BenchmarkCreateSnapshot(b *testing.B) {
	p, c := pool(), b.Context()
	name := uniqueName(b, "bench-snap")
	if _, err := p.CreateVolume(c, name, 64<<20); err != nil {
		b.Fatal(err)
	}
	defer p.DeleteVolume(c, name)
	i := 0
	for b.Loop() {
		i++
		if _, err := p.CreateSnapshots(c, []string{name}, fmt.Sprintf("s%d", i), snapshot.SnapshotOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
