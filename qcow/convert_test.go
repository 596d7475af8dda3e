package qcow

import (
	"reflect"
	"testing"
)

// TestPlanClusters checks how an allocation map becomes output clusters.
func TestPlanClusters(t *testing.T) {
	const k = 1024
	data := func(off, n int64) Extent { return Extent{Offset: off, Length: n, Kind: Data} }
	zero := func(off, n int64) Extent { return Extent{Offset: off, Length: n, Kind: Zero, Layer: 1} }
	hole := func(off, n int64) Extent { return Extent{Offset: off, Length: n, Kind: Unallocated} }
	run := func(g, n int64, kind unitKind) clusterRun { return clusterRun{guest: g, count: n, kind: kind} }
	cases := []struct {
		name    string
		ext     []Extent
		overlay bool
		want    []clusterRun
	}{
		{"empty", nil, false, nil},
		{"aligned data", []Extent{data(0, 8*k)}, false, []clusterRun{run(0, 2, unitData)}},
		{"partial cluster is data", []Extent{data(1*k, 1)}, false, []clusterRun{run(0, 1, unitData)}},
		{"holes skipped", []Extent{data(0, 4*k), hole(4*k, 8*k), data(12*k, 4*k)}, false,
			[]clusterRun{run(0, 1, unitData), run(3, 1, unitData)}},
		{"zeros skipped standalone", []Extent{zero(0, 8*k), data(8*k, 4*k)}, false, []clusterRun{run(2, 1, unitData)}},
		{"zeros kept in overlay", []Extent{zero(0, 8*k), data(8*k, 4*k)}, true,
			[]clusterRun{run(0, 2, unitZero), run(2, 1, unitData)}},
		{"partial zero edges become data", []Extent{zero(2*k, 8*k)}, true,
			[]clusterRun{run(0, 1, unitData), run(1, 1, unitZero), run(2, 1, unitData)}},
		{"data wins a shared cluster", []Extent{zero(0, 6*k), data(6*k, 2*k)}, true,
			[]clusterRun{run(0, 1, unitZero), run(1, 1, unitData)}},
		{"adjacent layers merge", []Extent{data(0, 4*k), {Offset: 4 * k, Length: 4 * k, Kind: Data, Layer: 3}}, false,
			[]clusterRun{run(0, 2, unitData)}},
		{"unsorted input", []Extent{data(8*k, 4*k), data(0, 4*k)}, false, []clusterRun{run(0, 1, unitData), run(2, 1, unitData)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := planClusters(tc.ext, 12, tc.overlay)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestCompressedEntryRoundTrip: the L2 entry we write for a compressed
// cluster reads back as the same range, for every cluster size.
func TestCompressedEntryRoundTrip(t *testing.T) {
	for bits := uint32(minClusterBits); bits <= maxClusterBits; bits++ {
		cs := int64(1) << bits
		for _, c := range []struct{ off, size int64 }{{cs, 1}, {cs + 511, 2}, {3*cs + 100, cs - 1}, {1 << 40, cs / 3}} {
			e := makeCompressedEntry(bits, c.off, c.size)
			off, size := e.compressedRange(bits)
			if off != c.off || size < c.size || off+size > (c.off+c.size+511)&^511 {
				t.Errorf("cluster bits %d: wrote %d+%d, reads %d+%d", bits, c.off, c.size, off, size)
			}
		}
	}
}

// TestRefcountAt decodes every refcount width as QEMU packs it.
func TestRefcountAt(t *testing.T) {
	block := []byte{0b10_01_11_00, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0}
	cases := []struct {
		bits uint
		i    int64
		want uint64
	}{
		{1, 0, 0}, {1, 2, 1}, {1, 7, 1}, {1, 6, 0},
		{2, 0, 0}, {2, 1, 3}, {2, 2, 1}, {2, 3, 2},
		{4, 0, 0xc}, {4, 1, 0x9}, {4, 2, 0x2}, {4, 3, 0x1},
		{8, 1, 0x12}, {16, 1, 0x3456}, {32, 1, 0x789abcde}, {64, 0, 0x9c123456789abcde},
	}
	for _, c := range cases {
		if got := refcountAt(block, c.i, c.bits); got != c.want {
			t.Errorf("width %d entry %d: got %#x, want %#x", c.bits, c.i, got, c.want)
		}
	}
}
