//go:build ceph && cgo

package rbdio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// Reads are split into pieces that each stay within one RADOS object and
// at most maxPiece long, and up to maxInFlight pieces of one ReadAt are
// read at once: one request per object keeps as many OSD requests in flight
// as the read spans objects.
const (
	maxPiece    = 4 << 20
	maxInFlight = 8
)

// layer is one image of a clone chain, open read-only at the snapshot the
// layer above it reads through (layer 0: the image itself).
type layer struct {
	img  *rbd.Image
	name string // "POOL/IMAGE@SNAP", for messages
	// limit: reads through the chain see this layer only below it (the
	// smallest parent overlap on the way down from layer 0).
	limit      int64
	objectSize int64
	// release gives the handle back: layer 0 is the image's own, the
	// parents' are shared (handles.go).
	release func() error
}

// image is a [qcow.Image] over an RBD image, at a snapshot or at its live
// head.
//
// A snapshot never changes, nor do its parents' snapshots: its allocation
// map, which says which layer owns each range, is computed once, and each
// range is read straight from its owner. The head changes: its map is
// computed on each Extents call, and reads go to layer 0, where librbd
// follows the parents itself.
type image struct {
	cluster *Cluster
	name    string
	size    int64
	live    bool
	layers  []layer

	closeMu sync.RWMutex // read-held by each call that uses layers; Close write-holds it
	closed  bool

	mapMu  sync.Mutex // protects owners; a failed computation is retried
	owners []qcow.Extent

	ra readahead // snapshots only: the head changes under a cache
}

var _ qcow.Image = (*image)(nil)

// OpenSnapshot implements [snapshot.Backend]: the snapshot read through
// librbd, each range from the image of the clone chain that owns it.
func (p *Pool) OpenSnapshot(ctx context.Context, volume, name string) (qcow.Image, error) {
	if err := lookupName(volume); err != nil {
		return nil, err
	}
	if snapshot.CheckSnapshotName(name) != nil {
		return nil, fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, name, volume)
	}
	return p.openChain(volume, name)
}

// OpenHead implements [snapshot.Backend]: the live head, read through
// librbd. It changes while it is read, if a VM writes to it. A revert that
// was interrupted is finished first.
func (p *Pool) OpenHead(ctx context.Context, volume string) (qcow.Image, error) {
	if err := lookupName(volume); err != nil {
		return nil, err
	}
	if err := p.finishRevertByName(ctx, volume); err != nil {
		return nil, err
	}
	return p.openChain(volume, "")
}

// openChain opens volume at snapshot snap ("" for the live head) and the
// parents it reads through.
func (p *Pool) openChain(volume, snap string) (_ *image, err error) {
	top, err := p.openImage(volume, snap, false)
	if err != nil {
		return nil, err
	}
	im := &image{cluster: p.cluster, name: p.spec(volume), live: snap == ""}
	if snap != "" {
		im.name += "@" + snap
	}
	defer func() {
		if err != nil {
			for _, l := range im.layers {
				l.release()
			}
		}
	}()
	size, err := top.GetSize()
	if err != nil {
		top.Close()
		return nil, wrap("info "+im.name, err)
	}
	im.size = int64(size)
	cur, curName, limit, release := top, im.name, int64(size), top.Close
	if snap != "" {
		if release, err = p.useSnap(top, volume, snap); err != nil {
			top.Close()
			return nil, err
		}
	}
	for {
		st, err := cur.Stat()
		if err != nil {
			release()
			return nil, wrap("info "+curName, err)
		}
		im.layers = append(im.layers, layer{img: cur, name: curName, limit: limit, objectSize: int64(st.Obj_size), release: release})
		pr, err := parentOf(cur)
		if err != nil {
			return nil, err
		}
		if pr == nil {
			return im.opened(), nil
		}
		overlap, err := cur.GetOverlap()
		if err != nil {
			return nil, wrap("info "+curName, err)
		}
		limit = min(limit, int64(overlap))
		if limit == 0 {
			return im.opened(), nil // the parent shows nowhere
		}
		if len(im.layers) > maxChain {
			return nil, fmt.Errorf("%w: %s: clone chain deeper than %d", snapshot.ErrInvalid, im.name, maxChain)
		}
		next, releaseNext, err := p.cluster.acquireParent(*pr)
		if err != nil {
			return nil, err
		}
		cur, release = next, func() error { releaseNext(); return nil }
		curName = pr.pool + "/" + pr.image + "@" + pr.snap
	}
}

// opened counts im among the cluster's open images.
func (im *image) opened() *image {
	im.cluster.openImages.Add(1)
	return im
}

// Size implements [qcow.Image].
func (im *image) Size() int64 { return im.size }

// Depth is the number of images in the clone chain read through.
func (im *image) Depth() int { return len(im.layers) }

// Close implements [qcow.Image]. It waits for reads in progress.
func (im *image) Close() error {
	im.closeMu.Lock()
	defer im.closeMu.Unlock()
	if im.closed {
		return nil
	}
	im.closed = true
	defer im.cluster.openImages.Add(-1)
	// Fetches take no lock (see readahead): wait for them here.
	im.ra.wg.Wait()
	var first error
	for _, l := range im.layers {
		if err := l.release(); err != nil && first == nil {
			first = wrap("close "+l.name, err)
		}
	}
	return first
}

// errClosed is returned by calls on a closed image.
func (im *image) errClosed() error { return fmt.Errorf("%s: %w", im.name, os.ErrClosed) }

// Extents implements [qcow.Image]: Data for the whole objects that an
// image of the chain holds (Layer: its index, 0 for the image itself),
// Unallocated (Layer: the chain's depth) elsewhere.
func (im *image) Extents(off, length int64) ([]qcow.Extent, error) {
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("%w: extents at %d+%d", snapshot.ErrInvalid, off, length)
	}
	im.closeMu.RLock()
	defer im.closeMu.RUnlock()
	if im.closed {
		return nil, im.errClosed()
	}
	end := min(off+length, im.size)
	if off >= end {
		return []qcow.Extent{}, nil
	}
	owners, err := im.ownerMap()
	if err != nil {
		return nil, err
	}
	return clipExtents(owners, off, end), nil
}

// clipExtents returns the extents of a sorted, gapless map that fall in
// [off, end), trimmed to it.
func clipExtents(m []qcow.Extent, off, end int64) []qcow.Extent {
	i, _ := slices.BinarySearchFunc(m, off, func(e qcow.Extent, off int64) int {
		if e.End() <= off {
			return -1
		}
		if e.Offset > off {
			return 1
		}
		return 0
	})
	out := []qcow.Extent{}
	for ; i < len(m) && m[i].Offset < end; i++ {
		e := m[i]
		if e.Offset < off {
			e.Length -= off - e.Offset
			e.Offset = off
		}
		if e.End() > end {
			e.Length = end - e.Offset
		}
		out = append(out, e)
	}
	return out
}

// ownerMap returns the allocation map of the whole image: computed once
// for a snapshot, each time for the head.
func (im *image) ownerMap() ([]qcow.Extent, error) {
	if im.live {
		return im.computeOwners()
	}
	im.mapMu.Lock()
	defer im.mapMu.Unlock()
	if im.owners == nil {
		m, err := im.computeOwners()
		if err != nil {
			return nil, err
		}
		im.owners = m
	}
	return im.owners, nil
}

// span is a byte range [off, end).
type span struct{ off, end int64 }

// computeOwners asks each layer, top first, which whole objects it holds
// (diff-iterate from the beginning, parent excluded: the object map, with
// fast-diff). A range goes to the first layer that holds it, within the
// layer's limit: that is where librbd reads it from, since a clone reads
// an object from its parent only while the clone lacks the object.
func (im *image) computeOwners() ([]qcow.Extent, error) {
	var owned []span
	var out []qcow.Extent
	for i, l := range im.layers {
		var held []span
		err := l.img.DiffIterate(rbd.DiffIterateConfig{
			Offset: 0, Length: uint64(l.limit),
			IncludeParent: rbd.ExcludeParent, WholeObject: rbd.EnableWholeObject,
			Callback: func(off, length uint64, exists int, _ any) int {
				if exists != 0 {
					s := span{int64(off), min(int64(off+length), l.limit)}
					if s.off < s.end {
						held = append(held, s)
					}
				}
				return 0
			},
		})
		if err != nil {
			return nil, wrap("diff "+l.name, err)
		}
		held = normalize(held)
		for _, s := range subtract(held, owned) {
			out = append(out, qcow.Extent{Offset: s.off, Length: s.end - s.off, Kind: qcow.Data, Layer: i})
		}
		owned = normalize(append(owned, held...))
	}
	for _, s := range subtract([]span{{0, im.size}}, owned) {
		out = append(out, qcow.Extent{Offset: s.off, Length: s.end - s.off, Kind: qcow.Unallocated, Layer: len(im.layers)})
	}
	return mergeExtents(out), nil
}

// normalize sorts spans and merges those that overlap or touch.
func normalize(s []span) []span {
	slices.SortFunc(s, func(a, b span) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	out := s[:0]
	for _, x := range s {
		if n := len(out); n > 0 && x.off <= out[n-1].end {
			out[n-1].end = max(out[n-1].end, x.end)
			continue
		}
		out = append(out, x)
	}
	return out
}

// subtract returns the parts of a not in b; both sorted and disjoint.
func subtract(a, b []span) []span {
	var out []span
	j := 0
	for _, x := range a {
		cur := x.off
		for j < len(b) && b[j].end <= cur {
			j++
		}
		for k := j; k < len(b) && b[k].off < x.end; k++ {
			if b[k].off > cur {
				out = append(out, span{cur, b[k].off})
			}
			cur = max(cur, b[k].end)
		}
		if cur < x.end {
			out = append(out, span{cur, x.end})
		}
	}
	return out
}

// readPiece is one request: buf from layer l at off.
type readPiece struct {
	l   *layer
	off int64
	buf []byte
}

// ReadAt implements [io.ReaderAt]. It is safe for concurrent use.
func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: read at negative offset %d", snapshot.ErrInvalid, off)
	}
	im.closeMu.RLock()
	defer im.closeMu.RUnlock()
	if im.closed {
		return 0, im.errClosed()
	}
	if off >= im.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), im.size-off))
	var err error
	if im.live {
		err = readPieces(split(&im.layers[0], off, p[:n], nil))
	} else if ok, raErr := im.ra.read(im, p[:n], off); ok {
		err = raErr
	} else {
		err = im.readDirect(p[:n], off)
	}
	if err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readDirect reads buf at off of a snapshot, each range from the layer
// that owns it; buf lies within the image.
func (im *image) readDirect(buf []byte, off int64) error {
	owners, err := im.ownerMap()
	if err != nil {
		return err
	}
	var pieces []readPiece
	for _, e := range clipExtents(owners, off, off+int64(len(buf))) {
		b := buf[e.Offset-off : e.End()-off]
		if e.Kind == qcow.Data {
			pieces = split(&im.layers[e.Layer], e.Offset, b, pieces)
		} else {
			clear(b)
		}
	}
	return readPieces(pieces)
}

// split appends the pieces that read buf from l at off: cut at l's object
// boundaries and at maxPiece.
func split(l *layer, off int64, buf []byte, pieces []readPiece) []readPiece {
	step := min(l.objectSize, maxPiece)
	if step <= 0 {
		step = maxPiece
	}
	for len(buf) > 0 {
		n := min(int64(len(buf)), step-off%step)
		pieces = append(pieces, readPiece{l: l, off: off, buf: buf[:n]})
		off += n
		buf = buf[n:]
	}
	return pieces
}

// readPieces reads every piece, up to maxInFlight at once; the first error
// wins.
func readPieces(pieces []readPiece) error {
	if len(pieces) == 1 {
		return pieces[0].read()
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // protects first
		first error
	)
	sem := make(chan struct{}, maxInFlight)
	for _, pc := range pieces {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := pc.read(); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}

// read reads one piece. librbd reads short only past the end of the
// image, which pieces never reach: a short read is an error.
func (pc readPiece) read() error {
	n, err := pc.l.img.ReadAt(pc.buf, pc.off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(pc.buf)) {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: rbd read %s: %d bytes at %d, got %d", io.ErrUnexpectedEOF, pc.l.name, len(pc.buf), pc.off, n)
		}
		return wrap(fmt.Sprintf("read %s at %d", pc.l.name, pc.off), err)
	}
	return nil
}
