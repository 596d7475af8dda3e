package fs

import (
	"context"
	"errors"
	"fmt"
	"path"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/snapshot"
)

// dirContents is what one kind of directory holds. Directories read it from
// the model on every request, so a directory node keeps nothing but its
// identity.
type dirContents interface {
	// list returns the entries, for readdir.
	list(ctx context.Context) ([]treeNode, error)
	// find returns the entry called name, or an error wrapping
	// snapshot.ErrNotFound.
	find(ctx context.Context, name string) (treeNode, error)
}

// Optional abilities of a directory's contents. A directory without them
// refuses the operation with EPERM (EROFS on a read-only mount).
type (
	dirMkdirer interface {
		mkdir(ctx context.Context, name string) (treeNode, error)
	}
	dirRmdirer interface {
		rmdir(ctx context.Context, name string) error
	}
	dirCreater interface {
		create(ctx context.Context, name string) (treeNode, fusefs.FileHandle, error)
	}
	dirUnlinker interface {
		unlink(ctx context.Context, name string) error
	}
	dirSymlinker interface {
		symlink(ctx context.Context, target, name string) (treeNode, error)
	}
)

// dir is a directory node of any kind.
type dir struct {
	node
	contents dirContents
	mtime    time.Time
}

var (
	_ fusefs.NodeLookuper  = (*dir)(nil)
	_ fusefs.NodeReaddirer = (*dir)(nil)
	_ fusefs.NodeGetattrer = (*dir)(nil)
	_ fusefs.NodeSetattrer = (*dir)(nil)
	_ fusefs.NodeMkdirer   = (*dir)(nil)
	_ fusefs.NodeRmdirer   = (*dir)(nil)
	_ fusefs.NodeCreater   = (*dir)(nil)
	_ fusefs.NodeUnlinker  = (*dir)(nil)
	_ fusefs.NodeRenamer   = (*dir)(nil)
	_ fusefs.NodeSymlinker = (*dir)(nil)
	_ fusefs.NodeLinker    = (*dir)(nil)
	_ fusefs.NodeMknoder   = (*dir)(nil)
	_ fusefs.NodeStatfser  = (*dir)(nil)
)

// newDir returns a directory node. writable says whether its contents take
// mkdir, create or the like, for its permission bits.
func (f *filesystem) newDir(name string, id identity, contents dirContents, writable bool, mtime time.Time, entryTimeout time.Duration) *dir {
	return &dir{
		node: node{
			fsys:         f,
			name:         name,
			id:           id,
			mode:         syscall.S_IFDIR | f.perm(true, writable, true),
			entryTimeout: entryTimeout,
			// A directory's own attributes never change, only what
			// it holds: readdir and lookup always ask.
			attrTimeout: immutableTimeout,
		},
		contents: contents,
		mtime:    mtime,
	}
}

func (d *dir) attr(_ context.Context, a *fuse.Attr) error {
	d.fillAttr(a, 0, 0, d.mtime)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (d *dir) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, d, out)
}

// Lookup implements [fusefs.NodeLookuper].
func (d *dir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	child, err := d.contents.find(ctx, name)
	if err == nil {
		var in *fusefs.Inode
		in, err = newChild(ctx, d.EmbeddedInode(), child, out)
		if err == nil {
			return in, 0
		}
	}
	return nil, d.fsys.errno("lookup "+name, err)
}

// Readdir implements [fusefs.NodeReaddirer].
func (d *dir) Readdir(ctx context.Context) (fusefs.DirStream, syscall.Errno) {
	children, err := d.contents.list(ctx)
	if err != nil {
		return nil, d.fsys.errno("readdir "+d.name, err)
	}
	entries := make([]fuse.DirEntry, 0, len(children))
	for _, c := range children {
		n := c.base()
		entries = append(entries, fuse.DirEntry{Name: n.name, Mode: n.mode, Ino: n.id.ino()})
	}
	return fusefs.NewListDirStream(entries), 0
}

// refuse is the errno of an operation the directory does not do.
func (d *dir) refuse() syscall.Errno {
	if d.fsys.readOnly {
		return syscall.EROFS
	}
	return syscall.EPERM
}

// Mkdir implements [fusefs.NodeMkdirer].
func (d *dir) Mkdir(ctx context.Context, name string, _ uint32, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	m, ok := d.contents.(dirMkdirer)
	if !ok || d.fsys.readOnly {
		return nil, d.refuse()
	}
	child, err := m.mkdir(ctx, name)
	if err == nil {
		var in *fusefs.Inode
		// The mutation is done: a failed stat of the new directory
		// must not report mkdir as failed, so use a fresh context.
		in, err = newChild(context.WithoutCancel(ctx), d.EmbeddedInode(), child, out)
		if err == nil {
			return in, 0
		}
	}
	if errors.Is(err, snapshot.ErrBusy) || errors.Is(err, snapshot.ErrUnsupported) {
		// mkdir can only say EBUSY or ENOTSUP, as rmdir
		// (deleteWaiting): the log says why (qemu has a head open:
		// stop the VM first; no guest agent with --require-quiesce).
		d.fsys.log.Printf("snapfs: mkdir %s: %v", path.Join(d.EmbeddedInode().Path(nil), name), err)
	}
	return nil, d.fsys.errno("mkdir "+name, err)
}

// Rmdir implements [fusefs.NodeRmdirer]. go-fuse reports success when a
// directory has no Rmdir, so every directory has one.
func (d *dir) Rmdir(ctx context.Context, name string) syscall.Errno {
	r, ok := d.contents.(dirRmdirer)
	if !ok || d.fsys.readOnly {
		return d.refuse()
	}
	return d.fsys.errno("rmdir "+name, r.rmdir(ctx, name))
}

// Create implements [fusefs.NodeCreater].
func (d *dir) Create(ctx context.Context, name string, _ uint32, _ uint32, out *fuse.EntryOut) (*fusefs.Inode, fusefs.FileHandle, uint32, syscall.Errno) {
	c, ok := d.contents.(dirCreater)
	if !ok || d.fsys.readOnly {
		return nil, nil, 0, d.refuse()
	}
	child, fh, err := c.create(ctx, name)
	if err == nil {
		var in *fusefs.Inode
		in, err = newChild(ctx, d.EmbeddedInode(), child, out)
		if err == nil {
			// Writes go through at once: the import reads the
			// staging file when the writer closes it.
			return in, fh, fuse.FOPEN_DIRECT_IO, 0
		}
		if r, ok := fh.(fusefs.FileReleaser); ok {
			r.Release(ctx)
		}
	}
	return nil, nil, 0, d.fsys.errno("create "+name, err)
}

// Unlink implements [fusefs.NodeUnlinker]. Like Rmdir, it must exist.
func (d *dir) Unlink(ctx context.Context, name string) syscall.Errno {
	u, ok := d.contents.(dirUnlinker)
	if !ok || d.fsys.readOnly {
		return d.refuse()
	}
	return d.fsys.errno("unlink "+name, u.unlink(ctx, name))
}

// Setattr implements [fusefs.NodeSetattrer]: a directory's attributes come
// from the model and cannot be set.
func (d *dir) Setattr(ctx context.Context, _ fusefs.FileHandle, _ *fuse.SetAttrIn, _ *fuse.AttrOut) syscall.Errno {
	return d.refuse()
}

// Rename implements [fusefs.NodeRenamer]. Names are the model's: they are
// not renamed from the filesystem.
func (d *dir) Rename(context.Context, string, fusefs.InodeEmbedder, string, uint32) syscall.Errno {
	return d.refuse()
}

// Symlink implements [fusefs.NodeSymlinker].
func (d *dir) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	l, ok := d.contents.(dirSymlinker)
	if !ok || d.fsys.readOnly {
		return nil, d.refuse()
	}
	child, err := l.symlink(ctx, target, name)
	if err == nil {
		var in *fusefs.Inode
		// As in Mkdir: the mutation is done.
		in, err = newChild(context.WithoutCancel(ctx), d.EmbeddedInode(), child, out)
		if err == nil {
			return in, 0
		}
	}
	return nil, d.fsys.errno("symlink "+name, err)
}

// Link implements [fusefs.NodeLinker].
func (d *dir) Link(context.Context, fusefs.InodeEmbedder, string, *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, d.refuse()
}

// Mknod implements [fusefs.NodeMknoder].
func (d *dir) Mknod(context.Context, string, uint32, uint32, *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, d.refuse()
}

// Statfs implements [fusefs.NodeStatfser]: df shows the filesystem that
// imports are written to (the store's), so that its free space is what
// "df MOUNT" says.
func (d *dir) Statfs(_ context.Context, out *fuse.StatfsOut) syscall.Errno {
	var st syscall.Statfs_t
	if err := syscall.Statfs(d.fsys.staging, &st); err != nil {
		return d.fsys.errno("statfs", err)
	}
	out.FromStatfsT(&st)
	return 0
}

// staticContents is a directory with a fixed set of entries.
type staticContents []treeNode

func (s staticContents) list(context.Context) ([]treeNode, error) { return s, nil }

func (s staticContents) find(_ context.Context, name string) (treeNode, error) {
	for _, c := range s {
		if c.base().name == name {
			return c, nil
		}
	}
	return nil, notFound(name)
}

// notFound is the error of a lookup that finds nothing.
func notFound(name string) error {
	return fmt.Errorf("%w: %q", snapshot.ErrNotFound, name)
}

// rootIdentity is the identity of the root of a mount of backend.
func rootIdentity(backend snapshot.Backend) identity {
	return identity("snapfs").child(backend.Name())
}

// newRoot returns the root directory of the tree: f's backend and
// instances, and pools/ when the mount has pools (see pools.go).
func (f *filesystem) newRoot(pools []Pool) *dir {
	root := rootIdentity(f.backend)
	volumes, imports := f.backendDirs(root)
	instances := f.newDir("instances", root.child("instances"), instancesContents{f, root.child("instances")}, false, f.mounted, immutableTimeout)
	entries := staticContents{volumes, instances, imports}
	if len(pools) > 0 {
		entries = append(entries, f.newPoolsDir(root.child(poolsDir), pools))
	}
	return f.newDir("", root, entries, false, f.mounted, 0)
}
