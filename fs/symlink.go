package fs

import (
	"context"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// symlink is a link whose target comes from the model: latest, parent,
// disks/vda. The target is read again at every readlink (links move when
// snapshots are taken and deleted), and nothing is cached for long.
type symlink struct {
	node
	target func(ctx context.Context) (string, error)
	mtime  time.Time
}

var (
	_ fusefs.NodeGetattrer  = (*symlink)(nil)
	_ fusefs.NodeReadlinker = (*symlink)(nil)
	_ fusefs.NodeSetattrer  = (*symlink)(nil)
)

func (f *filesystem) newSymlink(name string, id identity, mtime time.Time, target func(context.Context) (string, error)) *symlink {
	return &symlink{
		node: node{
			fsys:         f,
			name:         name,
			id:           id,
			mode:         syscall.S_IFLNK | 0o777,
			entryTimeout: shortTimeout,
		},
		target: target,
		mtime:  mtime,
	}
}

func (s *symlink) attr(ctx context.Context, a *fuse.Attr) error {
	t, err := s.target(ctx)
	if err != nil {
		return err
	}
	s.fillAttr(a, int64(len(t)), 0, s.mtime)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (s *symlink) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, s, out)
}

// Setattr implements [fusefs.NodeSetattrer].
func (s *symlink) Setattr(context.Context, fusefs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

// Readlink implements [fusefs.NodeReadlinker].
func (s *symlink) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	t, err := s.target(ctx)
	if err != nil {
		return nil, s.fsys.errno("readlink "+s.name, err)
	}
	return []byte(t), 0
}
