package fs

import (
	"sync"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// closeOwners tells, at a FLUSH, whether the close(2) behind it is the
// writer's.
//
// The kernel sends a FLUSH on every close of a descriptor of an open file,
// and a process that forks, or starts a program, gives the child a copy of
// its descriptors: the child's close, or the exec that closes a
// close-on-exec descriptor (every Go os.OpenFile is one), sends a FLUSH too,
// while the writer goes on writing. Imports act on FLUSH (import_file.go),
// so they must not act on those.
//
// Each request names the caller's table of descriptors (the lock owner,
// current->files in the kernel): a forked child has its own, threads share
// one. Writes to files opened with FOPEN_DIRECT_IO, which every writable
// file of snapfs is, carry it. closeOwners remembers, per open file, the
// tables whose writes came through it, and drops a FLUSH from any other
// table: that close ends nobody's writing. A FLUSH of a file that nobody
// wrote to goes through (the shell that opens import/NAME for a redirect,
// and closes its first descriptor before cat writes, must not see an
// error). go-fuse hands neither the lock owner of a write nor that of a
// flush to the nodes, hence a wrapper of its raw interface.
//
// Dropping that FLUSH also keeps clear of the exec: an exec'ing process
// waits for the reply to its FLUSH while holding locks that /proc/PID/stat
// of it needs, so reading it there (callerExitFailed) would never end.
type closeOwners struct {
	fuse.RawFileSystem

	mu      sync.Mutex                     // protects writers
	writers map[uint64]map[uint64]struct{} // file handle → lock owners that wrote
}

// newCloseOwners wraps fs.
func newCloseOwners(fs fuse.RawFileSystem) *closeOwners {
	return &closeOwners{RawFileSystem: fs, writers: make(map[uint64]map[uint64]struct{})}
}

// Write implements [fuse.RawFileSystem]: it notes the writer's table.
func (c *closeOwners) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if in.WriteFlags&fuse.WRITE_LOCKOWNER != 0 {
		c.mu.Lock()
		owners := c.writers[in.Fh]
		if owners == nil {
			owners = make(map[uint64]struct{}, 1)
			c.writers[in.Fh] = owners
		}
		owners[in.LockOwner] = struct{}{}
		c.mu.Unlock()
	}
	return c.RawFileSystem.Write(cancel, in, data)
}

// Flush implements [fuse.RawFileSystem]: a FLUSH from a table that did not
// write to a file others wrote to is answered here.
func (c *closeOwners) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	if !c.writerClosing(in.Fh, in.LockOwner) {
		return fuse.OK
	}
	return c.RawFileSystem.Flush(cancel, in)
}

// writerClosing reports whether a FLUSH of fh from owner is one the file
// must see: owner wrote to it, or nobody did.
func (c *closeOwners) writerClosing(fh, owner uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	owners := c.writers[fh]
	if len(owners) == 0 {
		return true
	}
	_, wrote := owners[owner]
	return wrote
}

// Release implements [fuse.RawFileSystem]: the handle number may be given
// to the next open.
func (c *closeOwners) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	c.mu.Lock()
	delete(c.writers, in.Fh)
	c.mu.Unlock()
	c.RawFileSystem.Release(cancel, in)
}
