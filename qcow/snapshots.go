package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"time"
)

// SnapshotInfo describes one internal snapshot of a qcow2 image. The active
// layer is what a Chain reads; internal snapshots are only listed.
type SnapshotInfo struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	Created      time.Time `json:"created"`
	VMStateBytes uint64    `json:"vm_state_bytes"`
	DiskSize     uint64    `json:"disk_size,omitempty"`
	l1Offset     uint64
	l1Size       uint32
}

// snapshotHeaderBytes is the fixed part of a snapshot table entry, before
// its extra data, ID and name.
const snapshotHeaderBytes = 40

// readSnapshots parses the internal snapshot table, checking every entry
// against QEMU's limits and the file size.
func readSnapshots(r io.ReaderAt, h *header, fileSize int64) ([]SnapshotInfo, error) {
	if h.nbSnapshots == 0 {
		return nil, nil
	}
	be := binary.BigEndian
	cs := h.clusterSize()
	off := int64(h.snapshotsOffset)
	var snaps []SnapshotInfo
	for i := uint32(0); i < h.nbSnapshots; i++ {
		if off-int64(h.snapshotsOffset) > maxSnapTableBytes {
			return nil, fmt.Errorf("%w: snapshot table is larger than %d bytes", ErrLimit, maxSnapTableBytes)
		}
		var fixed [snapshotHeaderBytes]byte
		if off+int64(len(fixed)) > fileSize {
			return nil, corruptf("snapshot table entry %d runs past the end of the file", i)
		}
		// The bounds are checked: readFull, because an entry that ends at
		// the end of the file may be reported with io.EOF.
		if err := readFull(r, fixed[:], off); err != nil {
			return nil, fmt.Errorf("qcow: reading snapshot table: %w", err)
		}
		s := SnapshotInfo{
			l1Offset:     be.Uint64(fixed[0:]),
			l1Size:       be.Uint32(fixed[8:]),
			Created:      time.Unix(int64(be.Uint32(fixed[16:])), int64(be.Uint32(fixed[20:]))).UTC(),
			VMStateBytes: uint64(be.Uint32(fixed[32:])),
		}
		idSize, nameSize := int64(be.Uint16(fixed[12:])), int64(be.Uint16(fixed[14:]))
		extraSize := int64(be.Uint32(fixed[36:]))
		if extraSize > maxSnapExtraData {
			return nil, corruptf("snapshot %d has %d bytes of extra data (QEMU allows %d)", i, extraSize, maxSnapExtraData)
		}
		if err := checkTable(fmt.Sprintf("L1 table of snapshot %d", i), s.l1Offset, uint64(s.l1Size), 8, maxL1Bytes, cs, fileSize); err != nil {
			return nil, err
		}
		varLen := extraSize + idSize + nameSize
		if off+40+varLen > fileSize {
			return nil, corruptf("snapshot table entry %d runs past the end of the file", i)
		}
		rest := make([]byte, varLen)
		if err := readFull(r, rest, off+40); err != nil {
			return nil, fmt.Errorf("qcow: reading snapshot table: %w", err)
		}
		extra := rest[:extraSize]
		if len(extra) >= 8 {
			s.VMStateBytes = be.Uint64(extra[0:])
		}
		if len(extra) >= 16 {
			s.DiskSize = be.Uint64(extra[8:])
		}
		s.ID = string(rest[extraSize : extraSize+idSize])
		s.Name = string(rest[extraSize+idSize:])
		snaps = append(snaps, s)
		off += (40 + varLen + 7) &^ 7
	}
	return snaps, nil
}
