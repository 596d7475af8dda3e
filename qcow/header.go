package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"strings"
)

// Limits, the same as QEMU's (block/qcow2.h), so that every image QEMU opens
// opens here and nothing QEMU refuses is read.
const (
	magic              = 0x514649fb // "QFI\xfb"
	minClusterBits     = 9
	maxClusterBits     = 21
	maxL1Bytes         = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes   = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxSnapshots       = 65536    // QCOW_MAX_SNAPSHOTS
	maxSnapTableBytes  = 64 << 20 // QCOW_MAX_SNAPSHOTS_SIZE
	maxSnapExtraData   = 1024     // QCOW_MAX_SNAPSHOT_EXTRA_DATA
	maxBackingName     = 1023
	maxVirtualSize     = 1 << 62 // well past any real disk, small enough for offset arithmetic
	v2HeaderLength     = 72
	v3MinHeaderLength  = 104
	headerExtEnd       = 0x00000000
	extBackingFormat   = 0xe2792aca
	extFeatureNames    = 0x6803f857
	extBitmaps         = 0x23852875
	extFullDiskCrypto  = 0x0537be77
	extDataFile        = 0x44415441
	maxHeaderExtLength = 1 << 16
)

// Incompatible feature bits.
const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	compatLazyRefcounts = 1 << 0
	autoclearBitmaps    = 1 << 0
	autoclearRawData    = 1 << 1
)

// Compression is a qcow2 compression type.
type Compression uint8

// The compression types of qcow2.
const (
	CompressionZlib Compression = 0
	CompressionZstd Compression = 1
)

// String returns "zlib" or "zstd", as qemu-img calls them.
func (c Compression) String() string {
	switch c {
	case CompressionZlib:
		return "zlib"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression(%d)", int(c))
}

// MarshalText makes compression types print as their names in JSON.
func (c Compression) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText reads a compression type name back.
func (c *Compression) UnmarshalText(b []byte) (err error) {
	*c, err = ParseCompression(string(b))
	return err
}

// ParseCompression maps "zlib" or "zstd" to a Compression.
func ParseCompression(name string) (Compression, error) {
	switch name {
	case "zlib", "deflate":
		return CompressionZlib, nil
	case "zstd":
		return CompressionZstd, nil
	}
	return 0, fmt.Errorf("%w: compression type %q (want zlib or zstd)", ErrUnsupported, name)
}

// header is a parsed and validated qcow2 header.
type header struct {
	version          uint32
	backingOffset    uint64
	backingSize      uint32
	clusterBits      uint32
	size             uint64
	cryptMethod      uint32
	l1Size           uint32
	l1Offset         uint64
	refTableOffset   uint64
	refTableClusters uint32
	nbSnapshots      uint32
	snapshotsOffset  uint64
	incompatible     uint64
	compatible       uint64
	autoclear        uint64
	refcountOrder    uint32
	headerLength     uint32
	compression      Compression

	backingName   string
	backingFormat string
	dataFile      string
}

func (h *header) clusterSize() int64 { return 1 << h.clusterBits }
func (h *header) extendedL2() bool   { return h.incompatible&incompatExtendedL2 != 0 }
func (h *header) l2EntryBytes() int64 {
	if h.extendedL2() {
		return 16
	}
	return 8
}
func (h *header) l2Entries() int64 { return h.clusterSize() / h.l2EntryBytes() }

// corruptf returns an error wrapping ErrCorrupt.
func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// readHeader reads and validates the header of a qcow2 file. fileSize bounds
// every table the header points at.
func readHeader(r io.ReaderAt, fileSize int64) (*header, error) {
	buf := make([]byte, v3MinHeaderLength+8)
	n, err := r.ReadAt(buf, 0)
	if n < v2HeaderLength {
		if err == nil || err == io.EOF {
			return nil, corruptf("file is %d bytes, too short for a qcow2 header", fileSize)
		}
		return nil, fmt.Errorf("qcow: reading header: %w", err)
	}
	buf = buf[:n]
	be := binary.BigEndian
	if be.Uint32(buf[0:]) != magic {
		return nil, corruptf("bad magic number (not a qcow2 image)")
	}
	h := &header{
		version:          be.Uint32(buf[4:]),
		backingOffset:    be.Uint64(buf[8:]),
		backingSize:      be.Uint32(buf[16:]),
		clusterBits:      be.Uint32(buf[20:]),
		size:             be.Uint64(buf[24:]),
		cryptMethod:      be.Uint32(buf[32:]),
		l1Size:           be.Uint32(buf[36:]),
		l1Offset:         be.Uint64(buf[40:]),
		refTableOffset:   be.Uint64(buf[48:]),
		refTableClusters: be.Uint32(buf[56:]),
		nbSnapshots:      be.Uint32(buf[60:]),
		snapshotsOffset:  be.Uint64(buf[64:]),
		refcountOrder:    4,
		headerLength:     v2HeaderLength,
	}
	switch h.version {
	case 2:
	case 3:
		if len(buf) < v3MinHeaderLength {
			return nil, corruptf("file too short for a version 3 header")
		}
		h.incompatible = be.Uint64(buf[72:])
		h.compatible = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		h.refcountOrder = be.Uint32(buf[96:])
		h.headerLength = be.Uint32(buf[100:])
	default:
		return nil, fmt.Errorf("%w: qcow2 version %d (only 2 and 3 exist)", ErrUnsupported, h.version)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, corruptf("cluster size 2^%d is outside 512 B to 2 MiB", h.clusterBits)
	}
	cs := h.clusterSize()
	if h.version == 3 {
		if h.headerLength < v3MinHeaderLength {
			return nil, corruptf("header length %d is below the minimum %d", h.headerLength, v3MinHeaderLength)
		}
		if int64(h.headerLength) > cs {
			return nil, corruptf("header length %d exceeds the cluster size %d", h.headerLength, cs)
		}
		if h.headerLength%8 != 0 {
			return nil, corruptf("header length %d is not a multiple of 8", h.headerLength)
		}
		if h.headerLength > v3MinHeaderLength && len(buf) > v3MinHeaderLength {
			h.compression = Compression(buf[104])
		}
	}
	if unknown := h.incompatible &^ incompatKnown; unknown != 0 {
		return nil, fmt.Errorf("%w: unknown incompatible feature bits %#x", ErrUnsupported, unknown)
	}
	if h.incompatible&incompatCompression == 0 && h.compression != CompressionZlib {
		return nil, corruptf("compression type %d set without the compression-type feature bit", h.compression)
	}
	// QEMU (validate_compression_type) refuses the bit with zlib too: an
	// image it cannot open must not become a layer that it has to.
	if h.incompatible&incompatCompression != 0 && h.compression == CompressionZlib {
		return nil, corruptf("compression-type feature bit set with the default compression type (zlib)")
	}
	if h.compression != CompressionZlib && h.compression != CompressionZstd {
		return nil, fmt.Errorf("%w: compression type %d", ErrUnsupported, h.compression)
	}
	if h.cryptMethod != 0 {
		kind := map[uint32]string{1: "AES", 2: "LUKS"}[h.cryptMethod]
		if kind == "" {
			return nil, corruptf("unknown encryption method %d", h.cryptMethod)
		}
		return nil, fmt.Errorf("%w: %s encryption is not supported; decrypt it first (qemu-img convert --object secret,... -O qcow2)", ErrEncrypted, kind)
	}
	if h.refcountOrder > 6 {
		return nil, corruptf("refcount order %d is above 6 (64-bit refcounts)", h.refcountOrder)
	}
	if h.extendedL2() && h.clusterBits < 14 {
		return nil, corruptf("extended L2 entries need clusters of 16 KiB or more, not %d", cs)
	}
	if h.size > maxVirtualSize {
		return nil, fmt.Errorf("%w: virtual size %d", ErrLimit, h.size)
	}
	// Tables: aligned, within QEMU's limits, inside the file.
	if err := checkTable("L1 table", h.l1Offset, uint64(h.l1Size), 8, maxL1Bytes, cs, fileSize); err != nil {
		return nil, err
	}
	needL1 := divCeil(h.size, uint64(cs)*uint64(h.l2Entries()))
	if uint64(h.l1Size) < needL1 {
		return nil, corruptf("L1 table has %d entries, too few for a virtual size of %d (needs %d)", h.l1Size, h.size, needL1)
	}
	if err := checkTable("refcount table", h.refTableOffset, uint64(h.refTableClusters), uint64(cs), maxRefTableBytes, cs, fileSize); err != nil {
		return nil, err
	}
	if h.refTableClusters == 0 {
		return nil, corruptf("image has no refcount table")
	}
	if h.nbSnapshots > maxSnapshots {
		return nil, fmt.Errorf("%w: %d internal snapshots (QEMU allows %d)", ErrLimit, h.nbSnapshots, maxSnapshots)
	}
	// Entries vary in length: the table is checked for their fixed part,
	// as QEMU's qcow2_validate_table does (readSnapshots checks the rest).
	if err := checkTable("snapshot table", h.snapshotsOffset, uint64(h.nbSnapshots), snapshotHeaderBytes, maxSnapTableBytes, cs, fileSize); err != nil {
		return nil, err
	}
	if err := h.readExtensions(r, buf, fileSize); err != nil {
		return nil, err
	}
	if err := h.readBackingName(r, fileSize); err != nil {
		return nil, err
	}
	if h.incompatible&incompatDataFile != 0 && h.dataFile == "" {
		return nil, fmt.Errorf("%w: the image needs an external data file but does not name one", ErrDataFile)
	}
	if h.incompatible&incompatDataFile == 0 && h.autoclear&autoclearRawData != 0 {
		return nil, corruptf("raw external data bit set without an external data file")
	}
	return h, nil
}

// checkTable validates a table of count entries of entrySize bytes at off.
func checkTable(what string, off, count, entrySize, maxBytes uint64, cs, fileSize int64) error {
	if count > maxBytes/entrySize {
		return fmt.Errorf("%w: %s of %d entries is larger than QEMU allows (%d bytes)", ErrLimit, what, count, maxBytes)
	}
	// QEMU (qcow2_validate_table) checks the alignment even of an empty
	// table: so do we, so that we refuse no less than it does.
	if off%uint64(cs) != 0 {
		return corruptf("%s offset %#x is not aligned to a cluster", what, off)
	}
	// Nor may the table end past 2^63, empty or not: QEMU refuses it
	// ("offset invalid").
	if off > math.MaxInt64-count*entrySize {
		return corruptf("%s offset %#x is beyond 2^63", what, off)
	}
	if count == 0 {
		return nil
	}
	if off > uint64(fileSize) || count*entrySize > uint64(fileSize)-off {
		return corruptf("%s at %#x (%d bytes) runs past the end of the file (%d bytes)", what, off, count*entrySize, fileSize)
	}
	return nil
}

// readExtensions parses the header extensions that follow the header, up to
// the end of the first cluster.
//
// It walks them as QEMU's qcow2_read_extensions does: up to the backing
// file name or the end of the first cluster, an extension header that does
// not fit is an error, and bytes past the end of the file read as zeros (the
// end marker).
func (h *header) readExtensions(r io.ReaderAt, _ []byte, fileSize int64) error {
	if h.backingOffset > uint64(h.clusterSize()) {
		return corruptf("backing file name at %#x is outside the first cluster", h.backingOffset)
	}
	if h.backingOffset != 0 && h.backingOffset < uint64(h.headerLength) {
		return corruptf("backing file name at %#x overlaps the header", h.backingOffset)
	}
	end := h.clusterSize()
	if h.backingOffset != 0 {
		end = int64(h.backingOffset)
	}
	off := int64(h.headerLength)
	be := binary.BigEndian
	for off < end {
		var hdr [8]byte
		if err := readFull(r, hdr[:], off); err != nil {
			return fmt.Errorf("qcow: reading header extension at %#x: %w", off, err)
		}
		typ, length := be.Uint32(hdr[0:]), int64(be.Uint32(hdr[4:]))
		if typ == headerExtEnd {
			return nil
		}
		off += 8
		if off > end || length > end-off {
			return corruptf("header extension %#x of %d bytes runs past the end of the header area (%#x)", typ, length, end)
		}
		switch typ {
		case extBackingFormat, extDataFile:
			if length > maxHeaderExtLength {
				return corruptf("header extension %#x is %d bytes long", typ, length)
			}
			data := make([]byte, length)
			if err := readFull(r, data, off); err != nil {
				return fmt.Errorf("qcow: reading header extension %#x: %w", typ, err)
			}
			if typ == extBackingFormat {
				h.backingFormat = string(data)
			} else {
				h.dataFile = string(data)
			}
		case extFullDiskCrypto:
			return fmt.Errorf("%w: the image has a full disk encryption header", ErrEncrypted)
		}
		off += (length + 7) &^ 7
	}
	return nil
}

// readBackingName reads and checks the backing file name.
func (h *header) readBackingName(r io.ReaderAt, fileSize int64) error {
	if h.backingOffset == 0 {
		if h.backingSize != 0 {
			return corruptf("backing file name size %d with no offset", h.backingSize)
		}
		return nil
	}
	if h.backingSize > maxBackingName {
		return fmt.Errorf("%w: backing file name of %d bytes (QEMU allows %d)", ErrLimit, h.backingSize, maxBackingName)
	}
	if h.backingOffset > uint64(h.clusterSize()) || uint64(h.backingSize) > uint64(h.clusterSize())-h.backingOffset {
		return corruptf("backing file name at %#x (%d bytes) is outside the first cluster", h.backingOffset, h.backingSize)
	}
	if h.backingOffset+uint64(h.backingSize) > uint64(fileSize) {
		return corruptf("backing file name runs past the end of the file")
	}
	name := make([]byte, h.backingSize)
	// readFull: an empty name at the very end of the file is an empty read
	// at EOF, which ReadAt may report as io.EOF.
	if err := readFull(r, name, int64(h.backingOffset)); err != nil {
		return fmt.Errorf("qcow: reading backing file name: %w", err)
	}
	if strings.IndexByte(string(name), 0) >= 0 {
		return corruptf("backing file name contains a NUL byte")
	}
	h.backingName = string(name)
	return nil
}

func divCeil(a, b uint64) uint64 { return (a + b - 1) / b }
