package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"

	"snapfs/qcow"
)

// The exports of the mount, computed on read: a snapshot's full qcow2
// (volumes/V/snapshots/S/disk.qcow2) and its incremental overlays
// (volumes/V/snapshots/S2/since/S1.qcow2). Both are built here, over any
// backend, so that the mount and the tests serve the same bytes.

// ExportClusterSize is the cluster size of every qcow2 export. Full and
// incremental exports share it, so that an overlay's clusters line up with
// its backing file's, as qemu-img makes them by default.
const ExportClusterSize = 64 << 10

// Export is a qcow2 file computed on read over an open snapshot (see
// qcow.Export: Size, AllocatedBytes, ReadAt). Close closes the snapshot.
type Export struct {
	*qcow.Export
	img qcow.Image
}

// Close closes the snapshot image the export reads from.
func (e *Export) Close() error { return e.img.Close() }

// Image is the snapshot image the export reads from: closing it closes the
// export.
func (e *Export) Image() qcow.Image { return e.img }

// FullExport returns the flattened qcow2 export of snapshot snap of
// volume: a standalone image (no backing file) that holds every cluster
// the snapshot reads as data or zero. It is disk.qcow2 in the mount.
func FullExport(ctx context.Context, b Backend, volume, snap string) (*Export, error) {
	img, err := b.OpenSnapshot(ctx, volume, snap)
	if err != nil {
		return nil, err
	}
	x, err := qcow.NewExport(img, qcow.ExportOptions{ClusterSize: ExportClusterSize})
	if err != nil {
		img.Close()
		return nil, err
	}
	return &Export{Export: x, img: img}, nil
}

// SinceBackingName is the backing file that the incremental export of a
// snapshot since snapshot from names: the full export of from, relative
// to the overlay's directory. In the mount the overlay is
// volumes/V/snapshots/S2/since/FROM.qcow2 and its backing file
// volumes/V/snapshots/FROM/disk.qcow2, so a copy of the snapshots folder
// (cp -r, rsync -a) is a chain that qemu opens where it lands. It starts
// with "../", so qemu never takes a ':' in the name for a protocol.
func SinceBackingName(from string) string { return "../../" + from + "/disk.qcow2" }

// IncrementalExport returns snapshot to of volume as a qcow2 overlay on
// snapshot from (an older snapshot of the same volume): it holds exactly
// what Backend.Changed reports, data clusters for what changed and zero
// clusters for what became zero, and names SinceBackingName(from) as its
// backing file. Its size is proportional to the change. Flattened on top
// of from's full export, it reads exactly as to.
func IncrementalExport(ctx context.Context, b Backend, volume, from, to string) (*Export, error) {
	if from == "" || from == to {
		return nil, fmt.Errorf("%w: incremental export of %q since %q: want an older snapshot", ErrInvalid, to, from)
	}
	changed, err := b.Changed(ctx, volume, from, to)
	if err != nil {
		return nil, err
	}
	if changed == nil {
		changed = []qcow.Extent{} // nil would mean everything
	}
	img, err := b.OpenSnapshot(ctx, volume, to)
	if err != nil {
		return nil, err
	}
	x, err := qcow.NewExport(img, qcow.ExportOptions{
		ClusterSize:   ExportClusterSize,
		Delta:         changed,
		BackingName:   SinceBackingName(from),
		BackingFormat: "qcow2",
	})
	if err != nil {
		img.Close()
		return nil, err
	}
	return &Export{Export: x, img: img}, nil
}

// DropUnchangedZeros returns changed (extents of a newer image, as
// Backend.Changed reports them) without the parts of its Zero extents
// where from, the older image, reads zeros already: a cluster zeroed twice
// has not changed. It reads from's allocation map only, never data.
func DropUnchangedZeros(from qcow.Image, changed []qcow.Extent) ([]qcow.Extent, error) {
	out := make([]qcow.Extent, 0, len(changed))
	for _, c := range changed {
		if c.Kind != qcow.Zero {
			out = append(out, c)
			continue
		}
		old, err := from.Extents(c.Offset, c.Length)
		if err != nil {
			return nil, err
		}
		for _, e := range old {
			if e.Kind == qcow.Data {
				out = append(out, qcow.Extent{Offset: e.Offset, Length: e.Length, Kind: qcow.Zero, Layer: c.Layer})
			}
		}
	}
	return out, nil
}

// refineChunk is how much RefineChanged reads of each image at a time.
const refineChunk = 1 << 20

// RefineChanged compares from and to (an older and a newer image of the
// same size) over the candidate extents changed, cluster by cluster
// (clusterSize, 0 for ExportClusterSize), and returns exactly the clusters
// that differ: Data where to holds other bytes, Zero where to reads zeros
// and from did not. Layer is 0 in the result. It is for backends whose
// diff is coarse (Ceph reports whole objects for space written after a
// snapshot): it reads the candidates from both images, so it costs twice
// their size in reads.
func RefineChanged(ctx context.Context, from, to qcow.Image, changed []qcow.Extent, clusterSize int64) ([]qcow.Extent, error) {
	if clusterSize <= 0 {
		clusterSize = ExportClusterSize
	}
	if from.Size() != to.Size() {
		return nil, fmt.Errorf("%w: images of %d and %d bytes", ErrInvalid, from.Size(), to.Size())
	}
	size := to.Size()
	cand := slices.Clone(changed)
	slices.SortFunc(cand, func(a, b qcow.Extent) int { return cmpInt64(a.Offset, b.Offset) })
	out := []qcow.Extent{}
	emit := func(off, length int64, kind qcow.ExtentKind) {
		if n := len(out); n > 0 && out[n-1].Kind == kind && out[n-1].End() == off {
			out[n-1].Length += length
			return
		}
		out = append(out, qcow.Extent{Offset: off, Length: length, Kind: kind})
	}
	chunk := max(refineChunk/clusterSize, 1) * clusterSize
	a, b := make([]byte, chunk), make([]byte, chunk)
	next := int64(0) // clusters before next are done
	for _, c := range cand {
		if c.Kind == qcow.Unallocated || c.Length <= 0 {
			continue
		}
		start := max(c.Offset/clusterSize*clusterSize, next)
		end := min((c.End()+clusterSize-1)/clusterSize*clusterSize, size)
		for off := start; off < end; off += chunk {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			n := min(chunk, end-off)
			if err := readFullAt(from, a[:n], off); err != nil {
				return nil, err
			}
			if err := readFullAt(to, b[:n], off); err != nil {
				return nil, err
			}
			for k := int64(0); k < n; k += clusterSize {
				m := min(clusterSize, n-k)
				oldC, newC := a[k:k+m], b[k:k+m]
				switch {
				case bytes.Equal(oldC, newC):
				case isZero(newC):
					emit(off+k, m, qcow.Zero)
				default:
					emit(off+k, m, qcow.Data)
				}
			}
		}
		next = max(next, end)
	}
	return out, nil
}

// readFullAt fills p from img at off; a short read at the end is an error.
func readFullAt(img qcow.Image, p []byte, off int64) error {
	n, err := img.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
