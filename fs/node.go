package fs

import (
	"context"
	"hash/fnv"
	"log"
	"strconv"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/snapshot"
)

// Timeouts of the kernel's caches. Directory entries that can appear and go
// outside the mount (a snapshot deleted with the snapfs command) are kept
// for a second; what never changes while its inode number stays the same
// is kept for an hour; what changes in place is not kept at all.
const (
	shortTimeout     = time.Second
	immutableTimeout = time.Hour
)

// filesystem is what every node of one mount shares.
type filesystem struct {
	backend   snapshot.Backend
	instances snapshot.InstanceProvider // nil: instances/ is empty
	staging   string                    // Config.StagingDir
	readOnly  bool
	uid, gid  uint32
	umask     uint32
	mounted   time.Time   // mtime of directories that have none of their own
	log       *log.Logger // one line per unexpected error
	// manager deletes snapshots, snapshots instances and holds the
	// snapshots whose files are open, so that rmdir gets EBUSY.
	manager *snapshot.Manager
	closing closingFiles
	// spares are the exports stat opened for an open to come, shared by
	// the trees of the mount: Wait closes those left.
	spares *spareExports
	// at is where the backend's tree shows in the mount: "" at the root,
	// "pools/NAME" for a pool (see pools.go); links to snapshots in other
	// trees are made relative from it (links.go).
	at string

	// ctx ends with the mount: long mutations started by a request stop
	// when the filesystem goes away, not when the request is interrupted
	// (see steadyContext).
	ctx    context.Context
	cancel context.CancelFunc
}

// errno maps err for a node method (see toErrno), logging errors that are
// not the caller's fault.
func (f *filesystem) errno(op string, err error) syscall.Errno {
	e, unknown := toErrno(err)
	if unknown {
		f.log.Printf("snapfs: %s: %v", op, err)
	}
	return e
}

// perm returns permission bits for a node: rwx for what the node allows,
// then masked by the mount's umask. The "other" bits are always cleared:
// disk images hold whole guest filesystems.
func (f *filesystem) perm(read, write, exec bool) uint32 {
	var p uint32
	if read {
		p |= 0o444
	}
	if write && !f.readOnly {
		p |= 0o222
	}
	if exec {
		p |= 0o111
	}
	return p &^ (f.umask | 0o007)
}

// identity names a node for its inode number: the names on the way from the
// root, with the creation time of everything that can be deleted and made
// again under the same name, so that a new snapshot "s1" is never mistaken
// (by the kernel's page cache) for a deleted one.
type identity string

// child returns the identity of a child named by parts.
func (id identity) child(parts ...string) identity {
	s := string(id)
	for _, p := range parts {
		// Length-prefixed: no name can be confused with two others.
		s += "/" + strconv.Itoa(len(p)) + ":" + p
	}
	return identity(s)
}

// versioned returns the identity of a child that has a creation time.
func (id identity) versioned(name string, created time.Time) identity {
	return id.child(name, strconv.FormatInt(created.UnixNano(), 10))
}

// ino returns the inode number: a hash of the identity, below 2^63 where
// go-fuse's automatic numbers start, and above 1, the root's.
func (id identity) ino() uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	ino := h.Sum64() &^ (1 << 63)
	if ino < 2 {
		ino += 2
	}
	return ino
}

// node is what every node of the tree has: the filesystem, its name in its
// parent, its identity and how it looks at stat.
type node struct {
	fusefs.Inode
	fsys *filesystem
	name string
	id   identity
	// mode is the file type and permission bits.
	mode uint32
	// entryTimeout and attrTimeout say how long the kernel may keep the
	// directory entry and the attributes.
	entryTimeout, attrTimeout time.Duration
}

// base returns the node itself, so that treeNode can be asked for it.
func (n *node) base() *node { return n }

// ioBlockSize is st_blksize: cp, cat and dd size their buffers from it
// (at least 128 KiB), and every read or write of a FUSE file is one round
// trip to this process, so it matches the largest request (MaxWrite).
const ioBlockSize = 1 << 20

// fillAttr sets what every node reports; size, blocks and times come from
// the node type. Blksize must be set: go-fuse replaces st_blocks by the size
// when it is not, and cp would then never look for holes.
func (n *node) fillAttr(a *fuse.Attr, size int64, allocated int64, mtime time.Time) {
	a.Ino = n.id.ino()
	a.Mode = n.mode
	a.Size = uint64(size)
	a.Blocks = blocks(allocated)
	a.Blksize = ioBlockSize
	a.Nlink = 1
	if n.mode&syscall.S_IFMT == syscall.S_IFDIR {
		a.Nlink = 2
	}
	a.Uid, a.Gid = n.fsys.uid, n.fsys.gid
	a.SetTimes(&mtime, &mtime, &mtime)
}

// treeNode is a node of any type.
type treeNode interface {
	fusefs.InodeEmbedder
	base() *node
	// attr fills in the attributes from the model.
	attr(ctx context.Context, a *fuse.Attr) error
}

// getattr implements NodeGetattrer for every node type.
func getattr(ctx context.Context, t treeNode, out *fuse.AttrOut) syscall.Errno {
	n := t.base()
	ctx, cancel := n.fsys.steadyContext(ctx)
	defer cancel()
	if err := t.attr(ctx, &out.Attr); err != nil {
		return n.fsys.errno("stat "+n.name, err)
	}
	out.SetTimeout(n.attrTimeout)
	return 0
}

// newChild makes the inode of child under parent, filling out as the
// kernel needs it for a lookup, mkdir or create.
func newChild(ctx context.Context, parent *fusefs.Inode, child treeNode, out *fuse.EntryOut) (*fusefs.Inode, error) {
	n := child.base()
	// A node known already (same name, same identity) is used as it is,
	// with what it caches (an export's size and allocation): go-fuse
	// would keep it anyway, and drop the new one.
	if known := parent.GetChild(n.name); known != nil && known.StableAttr().Ino == n.id.ino() {
		if t, ok := known.Operations().(treeNode); ok {
			child, n = t, t.base()
		}
	}
	actx, cancel := n.fsys.steadyContext(ctx)
	defer cancel()
	if err := child.attr(actx, &out.Attr); err != nil {
		return nil, err
	}
	out.SetEntryTimeout(n.entryTimeout)
	out.SetAttrTimeout(n.attrTimeout)
	return parent.NewInode(ctx, child, fusefs.StableAttr{
		Mode: n.mode & syscall.S_IFMT,
		Ino:  n.id.ino(),
	}), nil
}

// steadyContext returns the context for the work of a request (a stat
// that walks an allocation map, a snapshot delete, an import): one that
// ignores interrupts from a caller that lives on and ends when the caller
// is dying or the filesystem is unmounted.
//
// The kernel interrupts a request for every signal the caller gets, and Go
// programs get SIGURG (goroutine preemption) many times a second: honoring
// those would make stat, mkdir or close() of an import fail at random with
// EINTR, which few programs retry (qemu-img does not, for the size of
// head.raw). A signal that kills the caller is seen in /proc (see
// callerDying).
func (f *filesystem) steadyContext(ctx context.Context) (context.Context, context.CancelFunc) {
	mctx, cancel := context.WithCancel(f.ctx)
	caller, ok := fuse.FromContext(ctx)
	if !ok {
		return mctx, cancel
	}
	// Nothing runs until the request is interrupted (AfterFunc starts
	// no goroutine before that): stat and lookup come by the thousand.
	stop := context.AfterFunc(ctx, func() {
		// Interrupted: from now on, poll whether the caller is dying.
		// The kernel sends only one interrupt per request.
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			if callerDying(int(caller.Pid)) {
				cancel()
				return
			}
			select {
			case <-mctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	return mctx, func() {
		stop()
		cancel()
	}
}
