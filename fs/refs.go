package fs

import (
	"fmt"
	"sync"

	"snapfs/snapshot"
)

// snapshotRefs counts the open files of each snapshot, so that rmdir of a
// snapshot whose export is being read fails with EBUSY instead of pulling
// the data from under the reader, and marks the snapshots being deleted, so
// that nothing opens them meanwhile.
//
// Both the volume's files (volumes/V/snapshots/S/disk.raw) and an instance
// snapshot's (instances/I/snapshots/S/vda.raw) count for the volume
// snapshot V@S.
type snapshotRefs struct {
	mu       sync.Mutex // protects the fields below
	open     map[snapshot.SnapshotRef]int
	deleting map[snapshot.SnapshotRef]bool
}

// acquire counts one more open file of ref. It fails with ErrNotFound while
// ref is being deleted: the delete either succeeds, and the file would be
// gone, or fails, and a retry will work.
func (r *snapshotRefs) acquire(ref snapshot.SnapshotRef) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.deleting[ref] {
		return fmt.Errorf("%w: %s@%s is being deleted", snapshot.ErrNotFound, ref.Volume, ref.Snapshot)
	}
	if r.open == nil {
		r.open = make(map[snapshot.SnapshotRef]int)
	}
	r.open[ref]++
	return nil
}

// release undoes one acquire.
func (r *snapshotRefs) release(ref snapshot.SnapshotRef) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.open[ref] <= 0 {
		panic("BUG: snapshotRefs.release without acquire")
	}
	r.open[ref]--
	if r.open[ref] == 0 {
		delete(r.open, ref)
	}
}

// beginDelete marks refs as being deleted, all or none: it fails with
// ErrBusy if a file of any of them is open, or one is being deleted
// already. endDelete must follow.
func (r *snapshotRefs) beginDelete(refs ...snapshot.SnapshotRef) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ref := range refs {
		if n := r.open[ref]; n > 0 {
			return fmt.Errorf("%w: %s@%s has %d open file(s)", snapshot.ErrBusy, ref.Volume, ref.Snapshot, n)
		}
		if r.deleting[ref] {
			return fmt.Errorf("%w: %s@%s is being deleted", snapshot.ErrBusy, ref.Volume, ref.Snapshot)
		}
	}
	if r.deleting == nil {
		r.deleting = make(map[snapshot.SnapshotRef]bool)
	}
	for _, ref := range refs {
		r.deleting[ref] = true
	}
	return nil
}

// endDelete clears the marks of beginDelete.
func (r *snapshotRefs) endDelete(refs ...snapshot.SnapshotRef) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ref := range refs {
		delete(r.deleting, ref)
	}
}
