package qcow_test

import (
	"bytes"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// flattenCost is what opening and flattening one sparse image cost.
type flattenCost struct {
	heapInuse  int64 // live heap with the chain open, after flattening
	totalAlloc int64 // bytes allocated from before Open to after flattening
	dataBytes  int64
}

// flattenSparse opens a qcow2 image of the given virtual size holding 16
// runs of 256 KiB of data spread over all of it, and flattens it as a sparse
// export does: the allocation map, then the data extents only (reading a
// TiB of holes would measure memclr). The data must read back as qemu-io
// wrote it, and the map must agree with qemu-img map.
func flattenSparse(t *testing.T, size int64) flattenCost {
	t.Helper()
	img := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "sparse.qcow2"), fmt.Sprint(size))
	const runs, runLen = 16, 256 << 10
	offset := func(i int) int64 { return (size/runs*int64(i) + 3<<20) &^ (64<<10 - 1) }
	var cmds []string
	for i := range runs {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", i+1, offset(i), runLen))
	}
	qemutest.IO(t, img, cmds...)

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c, err := qcow.OpenPath(img, qcow.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ext, err := c.Extents(0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, runLen)
	var data int64
	for _, e := range ext {
		if e.Kind != qcow.Data {
			continue
		}
		for off := e.Offset; off < e.End(); off += int64(len(buf)) {
			p := buf[:min(int64(len(buf)), e.End()-off)]
			if _, err := c.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
			i := int((off - 3<<20) / (size / runs))
			if off < offset(i) || off >= offset(i)+runLen || !bytes.Equal(p, bytes.Repeat([]byte{byte(i + 1)}, len(p))) {
				t.Fatalf("data at %d is not run %d as qemu-io wrote it", off, i)
			}
			data += int64(len(p))
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(c)
	if data != runs*runLen {
		t.Fatalf("flattened %d bytes of data, qemu-io wrote %d", data, runs*runLen)
	}
	// The map, against qemu's: the same data ranges.
	var qemuData []qcow.Extent
	for _, m := range qemutest.Map(t, img) {
		if !m.Data {
			continue
		}
		if n := len(qemuData); n > 0 && qemuData[n-1].End() == m.Start {
			qemuData[n-1].Length += m.Length
			continue
		}
		qemuData = append(qemuData, qcow.Extent{Offset: m.Start, Length: m.Length, Kind: qcow.Data})
	}
	var ourData []qcow.Extent
	for _, e := range ext {
		if e.Kind == qcow.Data {
			ourData = append(ourData, e)
		}
	}
	if fmt.Sprint(ourData) != fmt.Sprint(qemuData) {
		t.Fatalf("data extents %v, qemu-img map says %v", ourData, qemuData)
	}
	return flattenCost{
		heapInuse:  int64(after.HeapInuse) - int64(before.HeapInuse),
		totalAlloc: int64(after.TotalAlloc - before.TotalAlloc),
		dataBytes:  data,
	}
}

// TestSparseTiBMemory: opening and flattening a 1 TiB image costs the same
// memory as a 1 GiB image with the same data. What may grow is the L1 table
// (8 bytes per 512 MiB with 64 KiB clusters: 16 KiB for a TiB) and the L2
// tables read (one per data run here, each 64 KiB): well under 4 MiB.
func TestSparseTiBMemory(t *testing.T) {
	small := flattenSparse(t, 1<<30)
	large := flattenSparse(t, 1<<40)
	t.Logf("1 GiB: heap in use %+d B, allocated %d B; 1 TiB: heap in use %+d B, allocated %d B",
		small.heapInuse, small.totalAlloc, large.heapInuse, large.totalAlloc)
	const slack = 4 << 20
	if large.totalAlloc-small.totalAlloc > slack {
		t.Errorf("flattening 1 TiB allocated %d bytes more than 1 GiB with the same data", large.totalAlloc-small.totalAlloc)
	}
	if large.heapInuse-small.heapInuse > slack {
		t.Errorf("with 1 TiB open, the heap holds %d bytes more than with 1 GiB", large.heapInuse-small.heapInuse)
	}
}
