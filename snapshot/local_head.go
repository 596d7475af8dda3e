package snapshot

import (
	"context"
	"sync"

	"snapfs/qcow"
)

// liveHead is a volume's head as the local store's OpenHead returns it:
// the chain of the head file, opened again at the first call after the
// head changed, so that a reader that keeps it open (head.raw in the
// mount) reads what the head holds now. A chain keeps the L1 and L2
// tables it has read, so clusters that the VM allocated after the open
// would read as they were (zeros); and a snapshot puts a new head file on
// top, which the old chain does not see. The check costs two stats: the
// store's metadata (load) and the head file.
//
// A volume deleted meanwhile is read as it was, as an open file that is
// unlinked is.
type liveHead struct {
	s      *LocalStore
	volume string

	mu    sync.Mutex // protects the fields below; held during reads
	chain *qcow.Chain
	file  string // the head file the chain was opened on, as the metadata names it
	id    fileID // what statID said of that file just before the open
}

var _ qcow.Image = (*liveHead)(nil)

// openLiveHead opens the head of volume.
func (s *LocalStore) openLiveHead(ctx context.Context, volume string) (*liveHead, error) {
	h := &liveHead{s: s, volume: volume}
	if err := h.reopen(ctx); err != nil {
		return nil, err
	}
	return h, nil
}

// reopen opens the chain of the volume's head as it is now, in place of
// the one open. h.mu is held, or h is new.
func (h *liveHead) reopen(ctx context.Context) error {
	var file string
	var id fileID
	c, err := h.s.openResolved(ctx, func(m *storeMeta) (string, error) {
		v, err := m.volume(h.volume)
		if err != nil {
			return "", err
		}
		// Stat first, open second: a write in between makes the next
		// check open again, never miss it. A failed stat leaves the
		// zero id, which no file has.
		file = v.Head
		id, _ = statID(h.s.layerPath(file))
		return file, nil
	})
	if err != nil {
		return err
	}
	if h.chain != nil {
		h.chain.Close()
	}
	h.chain, h.file, h.id = c, file, id
	return nil
}

// current returns the chain to read, opened again first if the head
// changed since it was opened. h.mu is held.
func (h *liveHead) current() (*qcow.Chain, error) {
	m, err := h.s.load()
	if err != nil {
		return nil, err
	}
	v, err := m.volume(h.volume)
	if err != nil {
		return h.chain, nil // deleted: read what was open
	}
	if v.Head == h.file {
		if id, err := statID(h.s.layerPath(v.Head)); err == nil && id == h.id {
			return h.chain, nil
		}
	}
	if err := h.reopen(context.Background()); err != nil {
		return nil, err
	}
	return h.chain, nil
}

// ReadAt implements [qcow.Image].
func (h *liveHead) ReadAt(p []byte, off int64) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, err := h.current()
	if err != nil {
		return 0, err
	}
	return c.ReadAt(p, off)
}

// Extents implements [qcow.Image].
func (h *liveHead) Extents(off, length int64) ([]qcow.Extent, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, err := h.current()
	if err != nil {
		return nil, err
	}
	return c.Extents(off, length)
}

// Size implements [qcow.Image]: the size now, or the size of the chain
// open when the head cannot be opened again.
func (h *liveHead) Size() int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if c, err := h.current(); err == nil {
		return c.Size()
	}
	return h.chain.Size()
}

// Close implements [qcow.Image].
func (h *liveHead) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.chain.Close()
}
