package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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
	l := &qcowLayer{f: f, data: f, h: h, id: newLayerID(), cache: cache, decompress: decompress}
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

func (l *qcowLayer) size() int64  { return int64(l.h.size) }
func (l *qcowLayer) file() File   { return l.f }
func (l *qcowLayer) close() error { return l.f.Close() }

// l2Table returns the L2 table at host offset off, through the cache.
func (l *qcowLayer) l2Table(off int64) ([]byte, error) {
	key := cacheKey{layer: l.id, offset: off, kind: cacheL2}
	if t := l.cache.get(key); t != nil {
		return t, nil
	}
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
	l.cache.put(key, t)
	return t, nil
}

// lookup implements layer. It walks the L2 table that covers off and
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
	table, err := l.l2Table(l2Off)
	if err != nil {
		return run{}, err
	}
	unitBits := h.clusterBits
	if h.extendedL2() {
		unitBits -= 5 // 32 subclusters
	}
	unit := int64(1) << unitBits
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
		_ = unit
	}
	return r, nil
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
