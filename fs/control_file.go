package fs

import (
	"bytes"
	"context"
	"sync"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// maxControlLine bounds what a control file takes before its newline: an
// argument is a name, not a document.
const maxControlLine = 4096

// controlFile is a write-only file that runs an action with each line
// written to it, such as instances/I/revert (`echo S > revert`). The
// action runs in the write that ends the line, so that its error is the
// write's, which the shell reports; bash ignores the error of close().
// A last line without a newline (printf S > revert) runs at close.
type controlFile struct {
	node
	mtime time.Time
	// action does what the line asks, arg without its newline or the
	// blanks around it.
	action func(ctx context.Context, arg string) error
}

var (
	_ fusefs.NodeGetattrer = (*controlFile)(nil)
	_ fusefs.NodeOpener    = (*controlFile)(nil)
	_ fusefs.NodeSetattrer = (*controlFile)(nil)
)

func (f *filesystem) newControlFile(name string, id identity, mtime time.Time, action func(ctx context.Context, arg string) error) *controlFile {
	return &controlFile{
		node: node{
			fsys:         f,
			name:         name,
			id:           id,
			mode:         syscall.S_IFREG | f.perm(false, true, false),
			entryTimeout: immutableTimeout,
			attrTimeout:  immutableTimeout,
		},
		mtime:  mtime,
		action: action,
	}
}

func (c *controlFile) attr(_ context.Context, a *fuse.Attr) error {
	c.fillAttr(a, 0, 0, c.mtime)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (c *controlFile) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, c, out)
}

// Setattr implements [fusefs.NodeSetattrer]: the truncation of `>` is
// accepted (there is nothing to truncate), anything else is refused.
func (c *controlFile) Setattr(ctx context.Context, _ fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if c.fsys.readOnly {
		return syscall.EROFS
	}
	if size, ok := in.GetSize(); !ok || size != 0 || in.Valid&^(fuse.FATTR_SIZE|fuse.FATTR_FH|fuse.FATTR_LOCKOWNER|fuse.FATTR_MTIME|fuse.FATTR_MTIME_NOW|fuse.FATTR_CTIME) != 0 {
		return syscall.EPERM
	}
	return getattr(ctx, c, out)
}

// Open implements [fusefs.NodeOpener]: for writing only.
func (c *controlFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if c.fsys.readOnly {
		return nil, 0, syscall.EROFS
	}
	if flags&syscall.O_ACCMODE != syscall.O_WRONLY {
		return nil, 0, syscall.EACCES
	}
	return &controlHandle{file: c}, fuse.FOPEN_DIRECT_IO, 0
}

// controlHandle is an open control file: the part of a line written so
// far.
type controlHandle struct {
	file *controlFile
	mu   sync.Mutex
	line []byte
}

var (
	_ fusefs.FileWriter  = (*controlHandle)(nil)
	_ fusefs.FileFlusher = (*controlHandle)(nil)
)

// run runs the action with line, mapping its error.
func (h *controlHandle) run(ctx context.Context, line []byte) syscall.Errno {
	arg := string(bytes.TrimSpace(line))
	if arg == "" {
		return 0
	}
	mctx, cancel := h.file.fsys.steadyContext(ctx)
	defer cancel()
	if err := h.file.action(mctx, arg); err != nil {
		return h.file.fsys.errno(h.file.name+" "+arg, err)
	}
	return 0
}

// Write implements [fusefs.FileWriter]: each complete line runs the
// action (offsets are ignored: the file is a stream of lines).
func (h *controlHandle) Write(ctx context.Context, data []byte, _ int64) (uint32, syscall.Errno) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.line = append(h.line, data...)
	for {
		i := bytes.IndexByte(h.line, '\n')
		if i < 0 {
			break
		}
		line := h.line[:i]
		h.line = h.line[i+1:]
		if errno := h.run(ctx, line); errno != 0 {
			h.line = nil
			return 0, errno
		}
	}
	if len(h.line) > maxControlLine {
		h.line = nil
		return 0, syscall.EINVAL
	}
	return uint32(len(data)), 0
}

// Flush implements [fusefs.FileFlusher]: a last line without its newline
// runs at close.
func (h *controlHandle) Flush(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	defer h.mu.Unlock()
	line := h.line
	h.line = nil
	return h.run(ctx, line)
}
