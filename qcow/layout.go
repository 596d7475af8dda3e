package qcow

import (
	"encoding/binary"
	"fmt"
	"sort"
)

// Every qcow2 file this package writes has the same layout, so that one
// generator serves the virtual export and the file writer:
//
//	cluster 0                header, extensions, backing file name
//	clusters 1 .. 1+D        data, in guest order (D clusters)
//	then                     L2 tables, for the L1 entries that need one
//	then                     the L1 table
//	then                     refcount blocks, then the refcount table
//
// Refcounts are 16 bits wide (refcount_order 4, QEMU's default). Everything
// after the data is derived from the runs, and is generated on demand.
const writeRefcountOrder = 4

// layout places the tables of an image to write.
type layout struct {
	clusterBits   uint32
	virtualSize   int64
	compression   Compression
	backingName   string
	backingFormat string

	runs []clusterRun // sorted by guest cluster, hosts assigned
	// dataRefs holds refcounts of the data clusters when they are not all
	// 1 (compressed clusters share host clusters); nil means all 1.
	dataRefs []uint16

	dataClusters int64   // D
	l2Tables     []int64 // L1 indices that have an L2 table, ascending
	l1Entries    int64
	// First host cluster of each region, and the total.
	l2Start, l1Start, refBlockStart, refTableStart, total int64
	l1Clusters, refBlocks, refTableClusters               int64
	header                                                []byte // cluster 0
}

func (lo *layout) cs() int64           { return 1 << lo.clusterBits }
func (lo *layout) l2PerTable() int64   { return lo.cs() / 8 }
func (lo *layout) refsPerBlock() int64 { return lo.cs() * 8 >> writeRefcountOrder }

// newLayout places the metadata after dataClusters data clusters.
func newLayout(clusterBits uint32, virtualSize int64, runs []clusterRun, dataClusters int64, dataRefs []uint16, compression Compression, backingName, backingFormat string) (*layout, error) {
	if virtualSize < 0 || virtualSize > maxVirtualSize {
		return nil, fmt.Errorf("%w: virtual size %d", ErrLimit, virtualSize)
	}
	if len(backingName) > maxBackingName {
		return nil, fmt.Errorf("%w: backing file name of %d bytes (QEMU allows %d)", ErrLimit, len(backingName), maxBackingName)
	}
	lo := &layout{clusterBits: clusterBits, virtualSize: virtualSize, runs: runs, dataClusters: dataClusters,
		dataRefs: dataRefs, compression: compression, backingName: backingName, backingFormat: backingFormat}
	cs := lo.cs()
	perTable := lo.l2PerTable()
	lo.l1Entries = int64(divCeil(uint64(virtualSize), uint64(cs*perTable)))
	if lo.l1Entries*8 > maxL1Bytes {
		return nil, fmt.Errorf("%w: virtual size %d needs an L1 table over %d bytes with %d-byte clusters; use larger clusters", ErrLimit, virtualSize, maxL1Bytes, cs)
	}
	for _, r := range runs {
		for t := r.guest / perTable; t <= (r.guest+r.count-1)/perTable; t++ {
			if n := len(lo.l2Tables); n == 0 || lo.l2Tables[n-1] != t {
				lo.l2Tables = append(lo.l2Tables, t)
			}
		}
	}
	lo.l2Start = 1 + dataClusters
	lo.l1Start = lo.l2Start + int64(len(lo.l2Tables))
	lo.l1Clusters = int64(divCeil(uint64(lo.l1Entries*8), uint64(cs)))
	lo.refBlockStart = lo.l1Start + lo.l1Clusters
	// The refcount blocks must count themselves and the table: iterate to
	// the fixed point.
	for {
		total := lo.refBlockStart + lo.refBlocks + lo.refTableClusters
		blocks := int64(divCeil(uint64(total), uint64(lo.refsPerBlock())))
		tableClusters := int64(divCeil(uint64(blocks*8), uint64(cs)))
		if blocks == lo.refBlocks && tableClusters == lo.refTableClusters {
			lo.total = total
			break
		}
		lo.refBlocks, lo.refTableClusters = blocks, tableClusters
	}
	lo.refTableStart = lo.refBlockStart + lo.refBlocks
	if lo.refTableClusters*cs > maxRefTableBytes {
		return nil, fmt.Errorf("%w: the image needs a refcount table over %d bytes; use larger clusters", ErrLimit, maxRefTableBytes)
	}
	if err := lo.buildHeader(); err != nil {
		return nil, err
	}
	return lo, nil
}

// size returns the size of the whole file.
func (lo *layout) size() int64 { return lo.total << lo.clusterBits }

// buildHeader renders cluster 0: a version 3 header, the backing format
// extension, and the backing file name.
func (lo *layout) buildHeader() error {
	cs := lo.cs()
	h := make([]byte, cs)
	be := binary.BigEndian
	const headerLength = 112 // v3 with the compression type byte, padded to 8
	be.PutUint32(h[0:], magic)
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], lo.clusterBits)
	be.PutUint64(h[24:], uint64(lo.virtualSize))
	be.PutUint32(h[36:], uint32(lo.l1Entries))
	be.PutUint64(h[40:], uint64(lo.l1Start)<<lo.clusterBits)
	be.PutUint64(h[48:], uint64(lo.refTableStart)<<lo.clusterBits)
	be.PutUint32(h[56:], uint32(lo.refTableClusters))
	var incompat uint64
	if lo.compression != CompressionZlib {
		incompat |= incompatCompression
	}
	be.PutUint64(h[72:], incompat)
	be.PutUint32(h[96:], writeRefcountOrder)
	be.PutUint32(h[100:], headerLength)
	h[104] = byte(lo.compression)
	off := int64(headerLength)
	putExt := func(typ uint32, data []byte) {
		be.PutUint32(h[off:], typ)
		be.PutUint32(h[off+4:], uint32(len(data)))
		copy(h[off+8:], data)
		off += 8 + (int64(len(data))+7)&^7
	}
	if lo.backingFormat != "" {
		putExt(extBackingFormat, []byte(lo.backingFormat))
	}
	putExt(headerExtEnd, nil)
	if lo.backingName != "" {
		if off+int64(len(lo.backingName)) > cs {
			return fmt.Errorf("%w: backing file name does not fit in a %d-byte cluster", ErrLimit, cs)
		}
		be.PutUint64(h[8:], uint64(off))
		be.PutUint32(h[16:], uint32(len(lo.backingName)))
		copy(h[off:], lo.backingName)
	}
	lo.header = h
	return nil
}

// readMeta fills p with the bytes of the file at off, which must lie in the
// metadata: the header cluster or anything after the data.
func (lo *layout) readMeta(p []byte, off int64) {
	cs := lo.cs()
	var cluster []byte
	for len(p) > 0 {
		index := off >> lo.clusterBits
		within := off & (cs - 1)
		if cluster == nil {
			cluster = make([]byte, cs)
		}
		lo.renderCluster(cluster, index)
		n := copy(p, cluster[within:])
		p, off = p[n:], off+int64(n)
	}
}

// renderCluster writes the metadata cluster at host cluster index into dst.
func (lo *layout) renderCluster(dst []byte, index int64) {
	clear(dst)
	be := binary.BigEndian
	switch {
	case index == 0:
		copy(dst, lo.header)
	case index >= lo.l2Start && index < lo.l1Start:
		lo.renderL2(dst, lo.l2Tables[index-lo.l2Start])
	case index >= lo.l1Start && index < lo.refBlockStart:
		first := (index - lo.l1Start) * (lo.cs() / 8)
		for i := int64(0); i < lo.cs()/8 && first+i < lo.l1Entries; i++ {
			t := sort.Search(len(lo.l2Tables), func(k int) bool { return lo.l2Tables[k] >= first+i })
			if t < len(lo.l2Tables) && lo.l2Tables[t] == first+i {
				be.PutUint64(dst[i*8:], uint64(lo.l2Start+int64(t))<<lo.clusterBits|flagCopied)
			}
		}
	case index >= lo.refBlockStart && index < lo.refTableStart:
		first := (index - lo.refBlockStart) * lo.refsPerBlock()
		for i := int64(0); i < lo.refsPerBlock() && first+i < lo.total; i++ {
			be.PutUint16(dst[i*2:], lo.refcount(first+i))
		}
	case index >= lo.refTableStart && index < lo.total:
		first := (index - lo.refTableStart) * (lo.cs() / 8)
		for i := int64(0); i < lo.cs()/8 && first+i < lo.refBlocks; i++ {
			be.PutUint64(dst[i*8:], uint64(lo.refBlockStart+first+i)<<lo.clusterBits)
		}
	default:
		panic(fmt.Sprintf("BUG: qcow layout: cluster %d is not metadata", index))
	}
}

// refcount returns the refcount of a host cluster.
func (lo *layout) refcount(index int64) uint16 {
	if index >= 1 && index < lo.l2Start && lo.dataRefs != nil {
		return lo.dataRefs[index-1]
	}
	return 1
}

// renderL2 writes L2 table t (covering guest clusters from t*perTable).
func (lo *layout) renderL2(dst []byte, t int64) {
	perTable := lo.l2PerTable()
	first, end := t*perTable, (t+1)*perTable
	be := binary.BigEndian
	i := sort.Search(len(lo.runs), func(k int) bool { return lo.runs[k].guest+lo.runs[k].count > first })
	for ; i < len(lo.runs) && lo.runs[i].guest < end; i++ {
		r := lo.runs[i]
		for g := max(r.guest, first); g < min(r.guest+r.count, end); g++ {
			var e uint64
			switch r.kind {
			case unitData:
				e = uint64(r.host+g-r.guest)<<lo.clusterBits | flagCopied
			case unitZero:
				e = flagZero
			case unitCompressed:
				e = uint64(r.host)
			}
			be.PutUint64(dst[(g-first)*8:], e)
		}
	}
}
