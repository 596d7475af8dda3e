package qcow

import (
	"fmt"
	"sort"
)

// clusterRun is a run of guest clusters of an output image that all read the
// same way: stored data (host-contiguous), a zero cluster, or one compressed
// cluster.
type clusterRun struct {
	guest int64 // first guest cluster
	count int64
	kind  unitKind // unitData, unitZero or unitCompressed
	// host is the first host cluster of a data run; for a compressed
	// cluster, the raw L2 entry.
	host int64
}

// planClusters turns an allocation map into the runs of output clusters
// to store, in guest order. A cluster touched by any Data extent is data (it
// is read whole from the source, so partial coverage reads right). When
// overlay is set, a cluster wholly covered by Zero extents is a zero cluster,
// so that it hides the backing file; otherwise zeros need no cluster at all.
// Host offsets are not assigned here.
func planClusters(ext []Extent, clusterBits uint32, overlay bool) []clusterRun {
	cs := int64(1) << clusterBits
	var runs []clusterRun
	add := func(first, end int64, kind unitKind) {
		if first >= end {
			return
		}
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			lastEnd := last.guest + last.count
			if first < lastEnd { // the two share the cluster at first
				switch {
				case last.kind == kind:
					first = lastEnd
				case kind == unitData: // data wins over zero
					last.count--
					if last.count == 0 {
						runs = runs[:n-1]
					}
				default:
					first = lastEnd
				}
				if first >= end {
					return
				}
			}
			if n := len(runs); n > 0 && runs[n-1].kind == kind && runs[n-1].guest+runs[n-1].count == first {
				runs[n-1].count += end - first
				return
			}
		}
		runs = append(runs, clusterRun{guest: first, count: end - first, kind: kind})
	}
	for _, e := range mergeKinds(ext) {
		first, end := e.Offset>>clusterBits, (e.End()+cs-1)>>clusterBits
		switch {
		case e.Kind == Data:
			add(first, end, unitData)
		case e.Kind == Zero && overlay:
			whole0, whole1 := (e.Offset+cs-1)>>clusterBits, e.End()>>clusterBits
			if whole0 >= whole1 {
				add(first, end, unitData)
				continue
			}
			add(first, whole0, unitData)
			add(whole0, whole1, unitZero)
			add(whole1, end, unitData)
		}
	}
	return runs
}

// mergeKinds sorts extents and merges neighbours of the same kind, whatever
// layer they come from.
func mergeKinds(ext []Extent) []Extent {
	sorted := append([]Extent(nil), ext...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Offset < sorted[j].Offset })
	var out []Extent
	for _, e := range sorted {
		if e.Length <= 0 || e.Kind == Unallocated {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Kind == e.Kind && out[n-1].End() >= e.Offset {
			out[n-1].Length = max(out[n-1].End(), e.End()) - out[n-1].Offset
			continue
		}
		out = append(out, e)
	}
	return out
}

// assignHosts gives data runs consecutive host clusters from first on, in
// guest order, and returns the number of host clusters used.
func assignHosts(runs []clusterRun, first int64) int64 {
	next := first
	for i := range runs {
		if runs[i].kind == unitData {
			runs[i].host = next
			next += runs[i].count
		}
	}
	return next - first
}

// clusterSizeBits validates a cluster size (0 means 64 KiB) and returns its
// log2.
func clusterSizeBits(size int64) (uint32, error) {
	if size == 0 {
		size = 64 << 10
	}
	for bits := uint32(minClusterBits); bits <= maxClusterBits; bits++ {
		if int64(1)<<bits == size {
			return bits, nil
		}
	}
	return 0, fmt.Errorf("%w: cluster size %d (a power of two from 512 B to 2 MiB)", ErrUnsupported, size)
}
