//go:build ceph && cgo

package rbdio

import (
	"slices"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rbd"
)

// Opening an RBD clone opens its whole parent chain inside librbd, a dozen
// round trips per image: opening every parent of a chain d deep ourselves
// (to read each range from the image that owns it, and to name the chain)
// costs d²/2 image opens, which at depth 8 took longer than reading a
// 512 MiB snapshot. A parent is always open at a snapshot, which never
// changes, so its handle is opened once and shared: by the images of every
// snapshot that reads through it, and by Volume, which names the chain.
// Handles no one uses are closed after handleIdle, or sooner when more
// than maxIdleHandles wait.
const (
	handleIdle     = time.Minute
	maxIdleHandles = 64
)

// handleKey names an image at a snapshot by ids: a snapshot id is never
// reused in a pool, so a handle at one reads the same bytes for as long as
// the snapshot exists, whatever is renamed or recreated around it.
type handleKey struct {
	pool, namespace, imageID string
	snapID                   uint64
}

// sharedHandle is a read-only handle of a parent at its snapshot.
type sharedHandle struct {
	img  *rbd.Image
	refs int
	idle time.Time // when refs fell to 0
}

// handleCache holds the shared parent handles of a Cluster.
type handleCache struct {
	mu      sync.Mutex // protects handles
	handles map[handleKey]*sharedHandle
}

// acquireParent returns a read-only handle of parent pr at its snapshot,
// shared, and the function that gives it back. librbd handles are safe for
// concurrent reads; a shared handle must not be moved to another snapshot.
func (c *Cluster) acquireParent(pr parentRef) (*rbd.Image, func(), error) {
	key := handleKey{pr.pool, pr.namespace, pr.imageID, pr.snapID}
	hc := &c.handles
	hc.mu.Lock()
	h := hc.handles[key]
	if h != nil {
		h.refs++
	}
	hc.mu.Unlock()
	if h == nil {
		img, err := c.openParent(pr)
		if err != nil {
			return nil, nil, err
		}
		hc.mu.Lock()
		if h = hc.handles[key]; h != nil {
			// Opened meanwhile by another caller: use theirs.
			defer img.Close()
		} else {
			if hc.handles == nil {
				hc.handles = map[handleKey]*sharedHandle{}
			}
			h = &sharedHandle{img: img}
			hc.handles[key] = h
		}
		h.refs++
		hc.mu.Unlock()
	}
	var once sync.Once
	return h.img, func() { once.Do(func() { c.releaseHandle(h) }) }, nil
}

// releaseHandle gives h back, and closes the handles idle for too long.
func (c *Cluster) releaseHandle(h *sharedHandle) {
	hc := &c.handles
	hc.mu.Lock()
	now := time.Now()
	if h.refs--; h.refs == 0 {
		h.idle = now
	}
	var idle []handleKey
	for k, x := range hc.handles {
		if x.refs == 0 {
			idle = append(idle, k)
		}
	}
	// Oldest first: past maxIdleHandles, and every one past handleIdle.
	slices.SortFunc(idle, func(a, b handleKey) int { return hc.handles[a].idle.Compare(hc.handles[b].idle) })
	var closing []*rbd.Image
	for i, k := range idle {
		x := hc.handles[k]
		if len(idle)-i > maxIdleHandles || now.Sub(x.idle) > handleIdle {
			closing = append(closing, x.img)
			delete(hc.handles, k)
		}
	}
	hc.mu.Unlock()
	for _, img := range closing {
		img.Close()
	}
}

// closeHandles closes every shared handle; none may be in use (Close).
func (c *Cluster) closeHandles() {
	hc := &c.handles
	hc.mu.Lock()
	defer hc.mu.Unlock()
	for k, h := range hc.handles {
		h.img.Close()
		delete(hc.handles, k)
	}
}
