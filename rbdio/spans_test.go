//go:build ceph && cgo

package rbdio

import (
	"reflect"
	"testing"

	"snapfs/qcow"
)

func TestNormalizeSubtract(t *testing.T) {
	for _, tc := range []struct {
		a, b, norm, diff []span
	}{
		{a: nil, b: nil, norm: []span{}, diff: nil},
		{a: []span{{5, 10}, {0, 3}, {3, 4}}, b: nil, norm: []span{{0, 4}, {5, 10}}, diff: []span{{0, 4}, {5, 10}}},
		{a: []span{{0, 10}}, b: []span{{2, 3}, {5, 7}}, norm: []span{{0, 10}}, diff: []span{{0, 2}, {3, 5}, {7, 10}}},
		{a: []span{{0, 10}, {20, 30}}, b: []span{{0, 25}}, norm: []span{{0, 10}, {20, 30}}, diff: []span{{25, 30}}},
		{a: []span{{0, 4}, {8, 12}}, b: []span{{2, 10}}, norm: []span{{0, 4}, {8, 12}}, diff: []span{{0, 2}, {10, 12}}},
		{a: []span{{0, 4}}, b: []span{{0, 4}}, norm: []span{{0, 4}}, diff: nil},
		{a: []span{{0, 8}, {2, 6}}, b: []span{{8, 9}}, norm: []span{{0, 8}}, diff: []span{{0, 8}}},
	} {
		norm := normalize(append([]span(nil), tc.a...))
		if len(norm) == 0 {
			norm = []span{}
		}
		if !reflect.DeepEqual(norm, tc.norm) {
			t.Errorf("normalize(%v) = %v, want %v", tc.a, norm, tc.norm)
		}
		if got := subtract(norm, tc.b); !reflect.DeepEqual(got, tc.diff) {
			t.Errorf("subtract(%v, %v) = %v, want %v", norm, tc.b, got, tc.diff)
		}
	}
}

func TestClipExtents(t *testing.T) {
	m := []qcow.Extent{
		{Offset: 0, Length: 10, Kind: qcow.Data, Layer: 0},
		{Offset: 10, Length: 10, Kind: qcow.Unallocated, Layer: 2},
		{Offset: 20, Length: 10, Kind: qcow.Data, Layer: 1},
	}
	for _, tc := range []struct {
		off, end int64
		want     []qcow.Extent
	}{
		{0, 30, m},
		{5, 6, []qcow.Extent{{Offset: 5, Length: 1, Kind: qcow.Data}}},
		{9, 21, []qcow.Extent{{Offset: 9, Length: 1, Kind: qcow.Data}, {Offset: 10, Length: 10, Kind: qcow.Unallocated, Layer: 2},
			{Offset: 20, Length: 1, Kind: qcow.Data, Layer: 1}}},
		{10, 20, []qcow.Extent{{Offset: 10, Length: 10, Kind: qcow.Unallocated, Layer: 2}}},
		{29, 30, []qcow.Extent{{Offset: 29, Length: 1, Kind: qcow.Data, Layer: 1}}},
	} {
		if got := clipExtents(m, tc.off, tc.end); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("clip [%d, %d) = %v, want %v", tc.off, tc.end, got, tc.want)
		}
	}
}

func TestSplit(t *testing.T) {
	l := &layer{objectSize: 8 << 20} // larger than maxPiece: pieces of 4 MiB
	buf := make([]byte, 10<<20)
	var got [][2]int64
	for _, p := range split(l, 3<<20, buf, nil) {
		got = append(got, [2]int64{p.off, int64(len(p.buf))})
	}
	want := [][2]int64{{3 << 20, 1 << 20}, {4 << 20, 4 << 20}, {8 << 20, 4 << 20}, {12 << 20, 1 << 20}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("split = %v, want %v", got, want)
	}
	small := &layer{objectSize: 1 << 20}
	got = nil
	for _, p := range split(small, 1<<20-1, make([]byte, 2), nil) {
		got = append(got, [2]int64{p.off, int64(len(p.buf))})
	}
	if want := [][2]int64{{1<<20 - 1, 1}, {1 << 20, 1}}; !reflect.DeepEqual(got, want) {
		t.Errorf("split across an object boundary = %v, want %v", got, want)
	}
}
