package fs

import (
	"context"
	"errors"
	"sync"
	"time"

	"snapfs/snapshot"
)

// closingFiles counts, per snapshot, the open files that have been closed
// (FLUSH) but not yet released. The kernel sends RELEASE after close(2) has
// returned, so `cat S/disk.raw; rmdir S` would find the snapshot still
// held (EBUSY) for a moment; rmdir waits for those releases instead (see
// deleteWaiting).
type closingFiles struct {
	mu sync.Mutex // protects n
	n  map[snapshot.SnapshotRef]int
}

func (c *closingFiles) add(ref snapshot.SnapshotRef, delta int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = make(map[snapshot.SnapshotRef]int)
	}
	c.n[ref] += delta
	if c.n[ref] <= 0 {
		delete(c.n, ref)
	}
}

// any reports whether a file of one of refs is closed but not released.
func (c *closingFiles) any(refs []snapshot.SnapshotRef) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range refs {
		if c.n[r] > 0 {
			return true
		}
	}
	return false
}

// releaseWait bounds how long a delete waits for the releases of files
// already closed: the kernel sends them within milliseconds.
const releaseWait = 2 * time.Second

// deleteWaiting runs del, the rmdir of what (a delete of refs), again
// while it fails with ErrBusy and a file of refs is closed but not yet
// released, for at most releaseWait. rmdir can only say EBUSY, so a delete
// still busy is logged with why: which clones, which instance snapshot.
func (f *filesystem) deleteWaiting(ctx context.Context, what string, refs func() []snapshot.SnapshotRef, del func() error) error {
	err := f.retryWhileClosing(ctx, refs, del)
	if errors.Is(err, snapshot.ErrBusy) {
		f.log.Printf("snapfs: rmdir %s: %v", what, err)
	}
	return err
}

// retryWhileClosing is deleteWaiting's loop.
func (f *filesystem) retryWhileClosing(ctx context.Context, refs func() []snapshot.SnapshotRef, del func() error) error {
	deadline := time.Now().Add(releaseWait)
	for {
		err := del()
		if !errors.Is(err, snapshot.ErrBusy) || time.Now().After(deadline) || !f.closing.any(refs()) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(5 * time.Millisecond):
		}
	}
}
