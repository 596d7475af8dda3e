package qcow

import (
	"fmt"
	"io"
	"sort"
)

// ExportOptions say what NewExport serves.
type ExportOptions struct {
	// ClusterSize of the export; 0 means 64 KiB.
	ClusterSize int64
	// BackingName and BackingFormat, when set, make the export an overlay
	// that names its backing file.
	BackingName   string
	BackingFormat string
	// Delta lists the ranges of src to store: Data ranges are stored as
	// data, Zero ranges as zero clusters in an overlay (a standalone image
	// reads zeros anyway); Unallocated ranges are skipped. Nil means all
	// of src.Extents. For an overlay it lists what differs from the
	// backing file: see ExtentsAbove.
	Delta []Extent
}

// Export is a virtual qcow2 file over an image: its bytes are computed on
// read and never written anywhere. Its size and layout are fixed when it is
// made, reading it never changes them, and the same source gives the same
// bytes on every read, in any order. It is safe for concurrent use when its
// source is.
type Export struct {
	src      Image
	lo       *layout
	dataRuns []clusterRun // the data runs of lo.runs, in host order
}

// NewExport lays out a qcow2 file over src. It reads src's allocation map
// (when opts.Delta is nil) but no data.
func NewExport(src Image, opts ExportOptions) (*Export, error) {
	bits, err := clusterSizeBits(opts.ClusterSize)
	if err != nil {
		return nil, err
	}
	delta := opts.Delta
	if delta == nil {
		if delta, err = src.Extents(0, src.Size()); err != nil {
			return nil, err
		}
	}
	runs := planClusters(delta, bits, opts.BackingName != "")
	data := assignHosts(runs, 1)
	lo, err := newLayout(bits, src.Size(), runs, data, nil, CompressionZlib, opts.BackingName, opts.BackingFormat)
	if err != nil {
		return nil, err
	}
	e := &Export{src: src, lo: lo}
	for _, r := range runs {
		if r.kind == unitData {
			e.dataRuns = append(e.dataRuns, r)
		}
	}
	return e, nil
}

// Size returns the size of the qcow2 file.
func (e *Export) Size() int64 { return e.lo.size() }

// AllocatedBytes returns how many bytes of the file hold something, for an
// honest st_blocks: every cluster of an export is used.
func (e *Export) AllocatedBytes() int64 { return e.lo.size() }

// DataBytes returns the bytes of guest data the export holds.
func (e *Export) DataBytes() int64 { return e.lo.dataClusters << e.lo.clusterBits }

// ReadAt implements [io.ReaderAt].
func (e *Export) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow: negative offset %d", off)
	}
	size := e.Size()
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	if err := e.read(p[:n], off); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (e *Export) read(p []byte, off int64) error {
	lo := e.lo
	dataStart, dataEnd := int64(1)<<lo.clusterBits, lo.l2Start<<lo.clusterBits
	for len(p) > 0 {
		var n int64
		switch {
		case off < dataStart || off >= dataEnd:
			n = int64(len(p))
			if off < dataStart {
				n = min(n, dataStart-off)
			}
			lo.readMeta(p[:n], off)
		default:
			var err error
			if n, err = e.readData(p[:min(int64(len(p)), dataEnd-off)], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readData fills a prefix of p, which starts in the data region, from the
// run that holds off, and returns how much it filled.
func (e *Export) readData(p []byte, off int64) (int64, error) {
	bits := e.lo.clusterBits
	host := off >> bits
	i := sort.Search(len(e.dataRuns), func(k int) bool { return e.dataRuns[k].host+e.dataRuns[k].count > host })
	if i == len(e.dataRuns) || e.dataRuns[i].host > host {
		panic("BUG: qcow export: data region cluster without a run")
	}
	r := e.dataRuns[i]
	runEnd := (r.host + r.count) << bits
	n := min(int64(len(p)), runEnd-off)
	guest := r.guest<<bits + off - r.host<<bits
	// The last cluster may reach past the virtual size: zeros there.
	avail := max(0, min(n, e.src.Size()-guest))
	if avail > 0 {
		if err := readFull(e.src, p[:avail], guest); err != nil {
			return 0, err
		}
	}
	clear(p[avail:n])
	return n, nil
}
