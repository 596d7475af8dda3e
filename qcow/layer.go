package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
)

// layer is one image of a chain, read on its own: it says how each range
// reads in this layer, and falls through nothing.
type layer interface {
	// size returns the virtual size.
	size() int64
	// lookup maps the run that starts at guest offset off: its kind and
	// where it is stored. The run is at most maxLen bytes, and for data it
	// is contiguous on the host.
	lookup(off, maxLen int64) (run, error)
	// read fills p with the data of a run returned by lookup for guest
	// offset off.
	read(p []byte, r run, off int64) error
	// file is what the layer is read from.
	file() File
	close() error
}

// run is the answer of layer.lookup.
type run struct {
	kind   unitKind
	length int64
	// host is the host offset of the run's first byte (unitData), or of
	// the compressed cluster (unitCompressed).
	host int64
	// csize is the stored size of a compressed cluster; guestBase the guest
	// offset where that cluster starts.
	csize     int64
	guestBase int64
}

// rawLayer is a raw image: every byte is data, at the same offset.
type rawLayer struct{ f File }

func (l *rawLayer) size() int64  { return l.f.Size() }
func (l *rawLayer) file() File   { return l.f }
func (l *rawLayer) close() error { return l.f.Close() }

// holeFinder is implemented by files that know where their holes are
// (local files, through SEEK_DATA and SEEK_HOLE). dataAt returns the start
// of the data at or after off and, when that is off itself, the end of it.
type holeFinder interface {
	dataAt(off int64) (start, end int64, err error)
}

// lookup implements layer. Holes of a sparse file read as zeros and are
// reported as zero runs owned by this layer, as qemu-img map does.
func (l *rawLayer) lookup(off, maxLen int64) (run, error) {
	maxLen = min(maxLen, l.f.Size()-off)
	if hf, ok := l.f.(holeFinder); ok {
		start, end, err := hf.dataAt(off)
		if err != nil {
			return run{}, fmt.Errorf("qcow: finding holes in %q: %w", l.f.Name(), err)
		}
		if start > off {
			return run{kind: unitZero, length: min(maxLen, start-off)}, nil
		}
		maxLen = min(maxLen, end-off)
	}
	return run{kind: unitData, length: maxLen, host: off}, nil
}

func (l *rawLayer) read(p []byte, r run, off int64) error {
	return readFull(l.f, p, r.host)
}

// readFull reads len(p) bytes at off; bytes past the end of the file read as
// zeros, as they do in QEMU.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	return err
}

// qcowLayer is one qcow2 image.
type qcowLayer struct {
	f    File
	data io.ReaderAt // where guest data lives: f, or an external data file
	h    *header
	l1   []l1Entry
	id   uint64 // identity in the cache

	cache      *Cache
	decompress Decompressor
	snapshots  []SnapshotInfo
}

// openQcow2 parses and validates a qcow2 image. The backing file and the
// external data file are not opened here.
func openQcow2(f File, cache *Cache, decompress Decompressor) (*qcowLayer, error) {
	fileSize := f.Size()
	h, err := readHeader(f, fileSize)
	if err != nil {
		return nil, err
	}
	l := &qcowLayer{f: f, data: f, h: h, id: cache.layerID(f), cache: cache, decompress: decompress}
	raw := make([]byte, int64(h.l1Size)*8)
	if err := readFull(f, raw, int64(h.l1Offset)); err != nil {
		return nil, fmt.Errorf("qcow: reading L1 table: %w", err)
	}
	l.l1 = make([]l1Entry, h.l1Size)
	cs := h.clusterSize()
	for i := range l.l1 {
		e := l1Entry(binary.BigEndian.Uint64(raw[i*8:]))
		if off := e.l2Offset(); off != 0 && off%cs != 0 {
			return nil, corruptf("L2 table offset %#x in L1 entry %d is not aligned to a cluster", off, i)
		}
		l.l1[i] = e
	}
	if l.snapshots, err = readSnapshots(f, h, fileSize); err != nil {
		return nil, err
	}
	return l, nil
}

// size implements layer. QEMU counts a qcow2 image in whole sectors and
// drops the rest (bs->total_sectors = size / 512): so do we, or a header
// that claims 65535 bytes would show a 511-byte tail that qemu, and a VM
// running off the image, never see.
func (l *qcowLayer) size() int64 { return int64(l.h.size) &^ (sectorBytes - 1) }

// sectorBytes is QEMU's unit of virtual sizes.
const sectorBytes = 512

func (l *qcowLayer) file() File   { return l.f }
func (l *qcowLayer) close() error { return l.f.Close() }

// l2Table returns the L2 table at host offset off, through the cache.
func (l *qcowLayer) l2Table(off int64) ([]byte, error) {
	key := cacheKey{layer: l.id, offset: off, kind: cacheL2}
	if t := l.cache.get(key); t != nil {
		return t, nil
	}
	t, err := l.readL2(off)
	if err != nil {
		return nil, err
	}
	l.cache.put(key, t)
	return t, nil
}

// readL2 reads the L2 table at host offset off, bypassing the cache.
func (l *qcowLayer) readL2(off int64) ([]byte, error) {
	cs := l.h.clusterSize()
	// A table that starts in the file and runs past its end reads as
	// zeros there, as in QEMU (iotests 060 reads an L2 table linked onto
	// the L1 table at the end of the file); one wholly past it is corrupt.
	if off >= l.f.Size() {
		return nil, corruptf("L2 table at %#x is past the end of the file (%d bytes)", off, l.f.Size())
	}
	t := make([]byte, cs)
	if _, err := l.f.ReadAt(t, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("qcow: reading L2 table at %#x: %w", off, err)
	}
	return t, nil
}

// l2Map is an L2 table of standard (not extended) entries parsed into
// runs of clusters that read alike: what lookups use, so that a lookup
// costs a binary search however long the run it falls in. A deep chain
// asks every layer above the one that holds a range, on every read: a
// scan of the entries each time would cost depth times the clusters read.
type l2Map struct {
	runs []l2Run // ascending by first, covering the whole table
	// entries is the number of entries of the table.
	entries int32
}

// l2Run is a run of entries of one kind: for data, host-contiguous.
type l2Run struct {
	first int32    // index of the run's first entry in the table
	kind  unitKind // or unitCorrupt
	// host is the host offset of the first cluster (unitData), or the
	// raw L2 entry (unitCompressed, one cluster per run).
	host int64
}

// unitCorrupt marks entries that unitAt refuses: the error is made again
// when a read reaches them, so that the rest of the table stays readable.
const unitCorrupt unitKind = -1

// What a parsed table takes in the cache's accounting: its runs, and the
// bookkeeping of an entry, so that many small maps are bounded too.
const (
	l2RunBytes    = 16
	l2MapOverhead = 256
)

// l2Map returns the parsed L2 table at host offset off, through the cache.
// l1Index is the index of an L1 entry that points at it.
func (l *qcowLayer) l2Map(off, l1Index int64) (*l2Map, error) {
	key := cacheKey{layer: l.id, offset: off, kind: cacheL2Map}
	if m, ok := l.cache.getValue(key).(*l2Map); ok {
		return m, nil
	}
	// The raw table is not cached as well: lookups need only the runs.
	table := l.cache.get(cacheKey{layer: l.id, offset: off, kind: cacheL2})
	if table == nil {
		var err error
		if table, err = l.readL2(off); err != nil {
			return nil, err
		}
	}
	m := l.parseL2(table, l1Index)
	l.cache.putValue(key, m, l2MapOverhead+int64(len(m.runs))*l2RunBytes)
	return m, nil
}

// parseL2 parses a table of standard L2 entries into runs.
func (l *qcowLayer) parseL2(table []byte, l1Index int64) *l2Map {
	h := l.h
	cs := h.clusterSize()
	n := h.l2Entries()
	m := &l2Map{entries: int32(n)}
	for j := int64(0); j < n; j++ {
		var kind unitKind
		var host int64
		if binary.BigEndian.Uint64(table[j*8:]) == 0 {
			kind = unitUnallocated // the common case, without the checks
		} else {
			var err error
			kind, host, err = l.unitAt(table, (l1Index*n+j)<<h.clusterBits, l1Index)
			if err != nil {
				kind = unitCorrupt
			}
		}
		if k := len(m.runs) - 1; k >= 0 {
			last := m.runs[k]
			switch {
			case kind != last.kind || kind == unitCompressed || kind == unitCorrupt:
			case kind != unitData || host == last.host+(j-int64(last.first))*cs:
				continue // the run goes on
			}
		}
		m.runs = append(m.runs, l2Run{first: int32(j), kind: kind, host: host})
	}
	return m
}

// lookup implements layer. It finds the L2 table that covers off and
// returns the longest run of units (clusters, or subclusters with extended
// L2 entries) of one kind, host-contiguous for data.
func (l *qcowLayer) lookup(off, maxLen int64) (run, error) {
	h := l.h
	cs := h.clusterSize()
	perTable := h.l2Entries()
	cluster := off >> h.clusterBits
	l1Index := cluster / perTable
	tableEnd := (l1Index + 1) * perTable * cs
	maxLen = min(maxLen, tableEnd-off, l.size()-off)
	l2Off := l.l1[l1Index].l2Offset()
	if l2Off == 0 {
		return run{kind: unitUnallocated, length: maxLen}, nil
	}
	if !h.extendedL2() {
		return l.lookupMap(off, maxLen, l2Off, l1Index)
	}
	table, err := l.l2Table(l2Off)
	if err != nil {
		return run{}, err
	}
	return l.lookupScan(table, off, maxLen, l1Index)
}

// lookupScan is lookup by a walk over the entries of the table from off:
// for extended L2 entries, whose subclusters a parsed map would multiply
// by 32. maxLen is clipped to the table already.
func (l *qcowLayer) lookupScan(table []byte, off, maxLen, l1Index int64) (run, error) {
	h := l.h
	cs := h.clusterSize()
	unitBits := h.clusterBits
	if h.extendedL2() {
		unitBits -= 5 // 32 subclusters
	}
	first := true
	var r run
	for pos := off; pos < off+maxLen; {
		kind, host, err := l.unitAt(table, pos, l1Index)
		if err != nil {
			return run{}, err
		}
		unitEnd := (pos>>unitBits + 1) << unitBits
		if kind == unitCompressed {
			unitEnd = (pos>>h.clusterBits + 1) << h.clusterBits
		}
		if first {
			r = run{kind: kind, host: host}
			if kind == unitCompressed {
				r.host, r.csize = l2Entry(host).compressedRange(h.clusterBits)
				r.guestBase = pos &^ (cs - 1)
				r.length = min(unitEnd, off+maxLen) - off
				return r, nil
			}
			first = false
		} else if kind != r.kind || (kind == unitData && host != r.host+(pos-off)) {
			break
		}
		pos = unitEnd
		r.length = min(pos, off+maxLen) - off
	}
	return r, nil
}

// lookupMap is lookup in a table of standard entries, through its l2Map.
// maxLen is clipped to the table already.
func (l *qcowLayer) lookupMap(off, maxLen, l2Off, l1Index int64) (run, error) {
	h := l.h
	m, err := l.l2Map(l2Off, l1Index)
	if err != nil {
		return run{}, err
	}
	tableStart := l1Index * h.l2Entries() << h.clusterBits
	j := int32((off - tableStart) >> h.clusterBits)
	k := sort.Search(len(m.runs), func(k int) bool { return m.runs[k].first > j }) - 1
	r := m.runs[k]
	end := m.entries
	if k+1 < len(m.runs) {
		end = m.runs[k+1].first
	}
	length := min(maxLen, tableStart+int64(end)<<h.clusterBits-off)
	switch r.kind {
	case unitCorrupt:
		table, err := l.l2Table(l2Off)
		if err != nil {
			return run{}, err
		}
		if _, _, err := l.unitAt(table, off, l1Index); err != nil {
			return run{}, err
		}
		panic("BUG: qcow: an L2 entry parsed as corrupt reads without error")
	case unitCompressed:
		cs := h.clusterSize()
		host, csize := l2Entry(r.host).compressedRange(h.clusterBits)
		return run{kind: unitCompressed, host: host, csize: csize, guestBase: off &^ (cs - 1), length: length}, nil
	case unitData:
		host := r.host + (off - tableStart - int64(r.first)<<h.clusterBits)
		return run{kind: unitData, host: host, length: length}, nil
	}
	return run{kind: r.kind, length: length}, nil
}

// unitAt classifies the unit holding guest offset pos in its L2 table, as
// QEMU's qcow2_get_subcluster_type does. For data it returns the host
// offset of pos itself; for compressed clusters the raw L2 entry.
func (l *qcowLayer) unitAt(table []byte, pos, l1Index int64) (unitKind, int64, error) {
	h := l.h
	cs := h.clusterSize()
	index := pos>>h.clusterBits - l1Index*h.l2Entries()
	inCluster := pos & (cs - 1)
	entry := l2Entry(binary.BigEndian.Uint64(table[index*h.l2EntryBytes():]))
	if entry.compressed() {
		if l.h.incompatible&incompatDataFile != 0 {
			return 0, 0, corruptf("compressed cluster at guest offset %#x in an image with an external data file", pos)
		}
		return unitCompressed, int64(entry), nil
	}
	host := entry.hostOffset()
	if host%cs != 0 {
		return 0, 0, corruptf("cluster at guest offset %#x has an unaligned host offset %#x", pos, host)
	}
	if !h.extendedL2() {
		switch {
		case entry.zero() && h.version < 3:
			// QEMU refuses to read it: its version 2 has no zero flag.
			return 0, 0, corruptf("zero cluster at guest offset %#x in a version 2 image", pos)
		case entry.zero():
			return unitZero, 0, nil
		case host == 0 && !(l.rawDataFile() && uint64(entry)&flagCopied != 0):
			return unitUnallocated, 0, nil
		}
		return unitData, host + inCluster, nil
	}
	bitmap := subclusterBitmap(binary.BigEndian.Uint64(table[index*16+8:]))
	if bitmap.conflicting() {
		return 0, 0, corruptf("subcluster bitmap %#x at guest offset %#x marks subclusters both allocated and zero", uint64(bitmap), pos)
	}
	sub := inCluster >> (h.clusterBits - 5)
	if host == 0 && !(l.rawDataFile() && uint64(entry)&flagCopied != 0) {
		if bitmap.anyAllocated() {
			return 0, 0, corruptf("subclusters allocated in an unallocated cluster at guest offset %#x", pos)
		}
		if bitmap.zero(sub) {
			return unitZero, 0, nil
		}
		return unitUnallocated, 0, nil
	}
	switch {
	case bitmap.zero(sub):
		return unitZero, 0, nil
	case bitmap.allocated(sub):
		return unitData, host + inCluster, nil
	}
	return unitUnallocated, 0, nil
}

func (l *qcowLayer) rawDataFile() bool {
	return l.h.incompatible&incompatDataFile != 0 && l.h.autoclear&autoclearRawData != 0
}

// read implements layer.
func (l *qcowLayer) read(p []byte, r run, off int64) error {
	switch r.kind {
	case unitData:
		return readFull(l.data, p, r.host)
	case unitCompressed:
		cluster, err := l.compressedCluster(r)
		if err != nil {
			return err
		}
		copy(p, cluster[off-r.guestBase:])
		return nil
	}
	panic("BUG: qcow read of a run that holds no data")
}

// compressedCluster returns the inflated cluster of a compressed run,
// through the cache.
func (l *qcowLayer) compressedCluster(r run) ([]byte, error) {
	key := cacheKey{layer: l.id, offset: r.host, kind: cacheCluster}
	if c := l.cache.get(key); c != nil {
		return c, nil
	}
	if r.host >= l.f.Size() {
		return nil, corruptf("compressed cluster at %#x is past the end of the file", r.host)
	}
	src := make([]byte, r.csize)
	if err := readFull(l.f, src, r.host); err != nil {
		return nil, fmt.Errorf("qcow: reading compressed cluster at %#x: %w", r.host, err)
	}
	dst := make([]byte, l.h.clusterSize())
	if err := l.decompress(l.h.compression, dst, src); err != nil {
		return nil, fmt.Errorf("compressed cluster at host offset %#x: %w", r.host, err)
	}
	l.cache.put(key, dst)
	return dst, nil
}
