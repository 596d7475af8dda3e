package qcow

// On-disk table entries, with the bit fields named.

const (
	// offsetMask selects bits 9-55: a cluster-aligned host offset in L1 and
	// standard L2 entries.
	offsetMask     = 0x00fffffffffffe00
	l1ReservedMask = 0x7f000000000001ff
	// l2ReservedMask: the bits of a standard (uncompressed) L2 entry that
	// must be 0, as QEMU's L2E_STD_RESERVED_MASK.
	l2ReservedMask = 0x3f000000000001fe
	flagCopied     = 1 << 63
	flagCompressed = 1 << 62
	flagZero       = 1 << 0
)

// l1Entry points at an L2 table.
type l1Entry uint64

// l2Offset returns the host offset of the L2 table, 0 if there is none.
func (e l1Entry) l2Offset() int64 { return int64(uint64(e) & offsetMask) }

// l2Entry describes one guest cluster (the first word of an extended entry).
type l2Entry uint64

func (e l2Entry) compressed() bool { return uint64(e)&flagCompressed != 0 }

// zero reports the all-zeros flag of a standard (not extended) entry.
func (e l2Entry) zero() bool { return uint64(e)&flagZero != 0 }

// hostOffset returns the host offset of a standard (uncompressed) cluster.
func (e l2Entry) hostOffset() int64 { return int64(uint64(e) & offsetMask) }

// compressedRange returns where the compressed data of a cluster lies: its
// host offset and how many bytes to read, as QEMU computes them.
func (e l2Entry) compressedRange(clusterBits uint32) (off, size int64) {
	shift := 62 - (clusterBits - 8)
	off = int64(uint64(e) & (1<<shift - 1))
	sectors := int64((uint64(e)>>shift)&(1<<(clusterBits-8)-1)) + 1
	return off, sectors*512 - off&511
}

// makeCompressedEntry encodes a compressed cluster stored at off with size
// bytes; the inverse of compressedRange.
func makeCompressedEntry(clusterBits uint32, off, size int64) l2Entry {
	shift := 62 - (clusterBits - 8)
	extra := (off+size-1)>>9 - off>>9
	return l2Entry(flagCompressed | uint64(extra)<<shift | uint64(off))
}

// subclusterBitmap is the second word of an extended L2 entry: bit i says
// subcluster i is allocated, bit 32+i that it reads as zeros.
type subclusterBitmap uint64

func (b subclusterBitmap) allocated(i int64) bool { return uint64(b)>>i&1 != 0 }
func (b subclusterBitmap) zero(i int64) bool      { return uint64(b)>>(32+i)&1 != 0 }
func (b subclusterBitmap) anyAllocated() bool     { return uint32(b) != 0 }
func (b subclusterBitmap) conflicting() bool      { return uint32(b)&uint32(b>>32) != 0 }

// unitKind is how one cluster (or subcluster) of one layer reads.
type unitKind int

const (
	unitUnallocated unitKind = iota
	unitZero
	unitData
	unitCompressed
)

// extentKind maps a unit kind to the allocation-map kind.
func (k unitKind) extentKind() ExtentKind {
	switch k {
	case unitZero:
		return Zero
	case unitData, unitCompressed:
		return Data
	}
	return Unallocated
}
