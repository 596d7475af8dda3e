package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/snapshot"
)

// Import: `cp IMAGE MOUNT/import/NAME`.
//
// create makes a staging file (in Config.StagingDir, see staging_linux.go)
// and import/NAME shows it while it is written. Writes go to the staging
// file at their offsets, so out-of-order writers (dd seek=, rsync
// --inplace) work and memory does not grow with the image.
//
// The import happens in FLUSH, the only reply the writer's close(2) waits
// for and reports: the staging file is opened as an untrusted image
// (snapshot.OpenUntrusted) and handed to Backend.ImportVolume. On success
// volumes/NAME appears. On failure close() returns the errno, the reason
// goes to the log (one line, with what to do), and nothing is created:
// every refused image (broken, hostile, with a backing or data file,
// encrypted, too large) is EINVAL, since the model's ImportError wraps
// snapshot.ErrInvalid; a full disk is ENOSPC; an import cut short is EINTR.
// Either way the staging file is removed.
//
// When a FLUSH comes:
//   - nothing was written or truncated yet: nothing to import (a shell opens
//     the file, dup2s it to stdout and closes the first descriptor before
//     cat writes anything);
//   - the writer is exiting after a failure (interrupted by ^C, killed):
//     what it wrote is not a whole image, and is dropped;
//   - another handle of the file is open: the import waits for its flush,
//     or for the last release.
//
// After a successful import, import/NAME stays for a minute (importLinger),
// read-only, with the size it had: tools stat the file and set its times
// after they close it (rsync --inplace does), and must not fail then.
//
// Lock order: importFile.mu, then importContents.mu.

// importLinger is how long import/NAME stays after its import succeeded.
const importLinger = time.Minute

// importContents is import/: the imports being written.
type importContents struct {
	fsys *filesystem
	id   identity

	mu       sync.Mutex // protects the fields below
	pending  map[string]*importFile
	finished map[string]finishedImport
}

// finishedImport is an import that succeeded, still shown in import/.
type finishedImport struct {
	f     *importFile
	until time.Time
}

// prune forgets the finished imports shown long enough. c.mu is held.
func (c *importContents) prune() {
	now := time.Now()
	for name, fi := range c.finished {
		if now.After(fi.until) {
			delete(c.finished, name)
		}
	}
}

func (c *importContents) list(context.Context) ([]treeNode, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.prune()
	out := make([]treeNode, 0, len(c.pending)+len(c.finished))
	for _, f := range c.pending {
		out = append(out, f)
	}
	for _, fi := range c.finished {
		out = append(out, fi.f)
	}
	return out, nil
}

func (c *importContents) find(_ context.Context, name string) (treeNode, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f, ok := c.pending[name]; ok {
		return f, nil
	}
	c.prune()
	if fi, ok := c.finished[name]; ok {
		return fi.f, nil
	}
	return nil, notFound(name)
}

// create starts the import of volume name.
func (c *importContents) create(ctx context.Context, name string) (treeNode, fusefs.FileHandle, error) {
	if err := snapshot.CheckVolumeName(name); err != nil {
		return nil, nil, err
	}
	if _, err := c.fsys.backend.Volume(ctx, name); err == nil {
		return nil, nil, fmt.Errorf("%w: volume %q", snapshot.ErrExists, name)
	} else if !errors.Is(err, snapshot.ErrNotFound) {
		return nil, nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.pending[name]; ok {
		return nil, nil, fmt.Errorf("%w: import %q is being written", snapshot.ErrExists, name)
	}
	tmp, err := createStaging(c.fsys.staging)
	if err != nil {
		return nil, nil, fmt.Errorf("import %s: creating the staging file: %w", name, err)
	}
	now := time.Now()
	f := &importFile{
		node: node{
			fsys: c.fsys,
			name: name,
			// A new identity for every import: the inode of a
			// finished import must not be mistaken for the next.
			id:   c.id.versioned(name, now),
			mode: syscall.S_IFREG | c.fsys.perm(true, true, false),
			// No caching: import/NAME goes when the import is done.
		},
		dir:     c,
		tmp:     tmp,
		started: now,
		writers: 1,
	}
	if c.pending == nil {
		c.pending = make(map[string]*importFile)
	}
	c.pending[name] = f
	delete(c.finished, name)
	return f, &importHandle{f: f, write: true}, nil
}

// unlink abandons an import being written.
func (c *importContents) unlink(_ context.Context, name string) error {
	c.mu.Lock()
	f, ok := c.pending[name]
	if _, done := c.finished[name]; done {
		delete(c.finished, name)
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	if !ok {
		return notFound(name)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.importing != nil {
		return fmt.Errorf("%w: import/%s is being imported", snapshot.ErrBusy, name)
	}
	f.finish(fmt.Errorf("%w: abandoned (unlinked)", syscall.ENOENT))
	return nil
}

// importFile is import/NAME while it is written.
type importFile struct {
	node
	dir     *importContents
	started time.Time

	// mu protects the fields below. It is held during the import itself,
	// so that no write slips in while the image is read.
	mu      sync.Mutex
	tmp     *os.File // nil once finished
	size    int64    // of the file when it finished
	writers int      // open handles that may write
	dirty   bool     // written or truncated since create
	done    bool     // imported, failed or abandoned: no more writes
	result  error    // of the import, once done
	// importing is closed when the import in progress ends; nil when
	// none is.
	importing chan struct{}
}

var (
	_ fusefs.NodeGetattrer = (*importFile)(nil)
	_ fusefs.NodeSetattrer = (*importFile)(nil)
	_ fusefs.NodeOpener    = (*importFile)(nil)
)

func (f *importFile) attr(_ context.Context, a *fuse.Attr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var size, alloc int64
	if f.tmp != nil {
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.tmp.Fd()), &st); err != nil {
			return err
		}
		size, alloc = st.Size, st.Blocks*512
	} else {
		size = f.size
	}
	f.fillAttr(a, size, alloc, f.started)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (f *importFile) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, f, out)
}

// Setattr implements [fusefs.NodeSetattrer]. A size truncates the staging
// file (cp ends a sparse copy with ftruncate; O_TRUNC comes as size 0).
// Mode, owner and times are accepted and ignored, so that cp -p and rsync
// -t do not fail: the volume gets its own.
func (f *importFile) Setattr(ctx context.Context, _ fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok {
		f.mu.Lock()
		err := f.writable()
		if err == nil {
			err = f.tmp.Truncate(int64(size))
			f.dirty = true
		}
		f.mu.Unlock()
		if err != nil {
			return f.fsys.errno("truncate import/"+f.name, err)
		}
	}
	return getattr(ctx, f, out)
}

// Open implements [fusefs.NodeOpener]: a second writer, or a reader of
// what was written so far.
func (f *importFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return nil, 0, f.fsys.errno("open import/"+f.name, err)
	}
	write := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	if write {
		f.writers++
	}
	return &importHandle{f: f, write: write}, fuse.FOPEN_DIRECT_IO, 0
}

// writable says why the file takes no more writes, if it does not. f.mu is
// held.
func (f *importFile) writable() error {
	if f.importing != nil {
		return fmt.Errorf("%w: import/%s is being imported", snapshot.ErrBusy, f.name)
	}
	if !f.done {
		return nil
	}
	if f.result == nil {
		return syscall.EBADF // imported already
	}
	return f.result
}

// flush imports the file if this is the moment: see the comment at the
// top of the file.
func (f *importFile) flush(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.waitImport()
	if f.done {
		return f.result
	}
	if !f.dirty || f.writers > 1 {
		return nil
	}
	if caller, ok := fuse.FromContext(ctx); ok {
		if failed, how := callerExitFailed(int(caller.Pid)); failed {
			f.finish(fmt.Errorf("import %s: abandoned: the writer (pid %d) %s before closing the file", f.name, caller.Pid, how))
			return f.result
		}
	}
	mctx, cancel := f.fsys.mutationContext(ctx)
	defer cancel()
	f.importVolume(mctx)
	return f.result
}

// errNothingWritten ends an import whose writers wrote nothing.
var errNothingWritten = errors.New("nothing was written")

// release drops a writer; the last one imports what no flush did (the
// flushes came while another writer was open), or drops an empty file.
// Its errors can only be logged.
func (f *importFile) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.writers--
	if f.writers > 0 || f.done || f.importing != nil {
		return
	}
	if !f.dirty {
		f.finish(errNothingWritten)
		return
	}
	mctx, cancel := context.WithCancel(f.fsys.ctx)
	defer cancel()
	f.importVolume(mctx)
}

// waitImport waits, with f.mu held, for an import in progress to end.
func (f *importFile) waitImport() {
	for f.importing != nil {
		ch := f.importing
		f.mu.Unlock()
		<-ch
		f.mu.Lock()
	}
}

// importVolume imports the staging file as volume f.name and finishes. It
// is called and returns with f.mu held, but releases it meanwhile, so that
// stat and ls of import/ answer during a long import; writes, truncates and
// unlinks get EBUSY then, and other flushes wait.
func (f *importFile) importVolume(ctx context.Context) {
	done := make(chan struct{})
	f.importing = done
	path := f.tmp.Name()
	f.mu.Unlock()

	// No fsync of the staging file: the store writes and syncs its own
	// copy, and after a crash the staging file is swept anyway.
	img, err := snapshot.OpenUntrusted(path)
	if err == nil {
		_, err = f.fsys.backend.ImportVolume(ctx, f.name, img, nil)
		img.Close()
	}

	f.mu.Lock()
	f.importing = nil
	close(done)
	f.finish(err)
}

// finish ends the import with result: the staging file is removed, the
// entry leaves import/, and the outcome is logged. f.mu is held.
func (f *importFile) finish(result error) {
	if f.done {
		return
	}
	f.done, f.result = true, result
	if f.tmp != nil {
		if st, err := f.tmp.Stat(); err == nil {
			f.size = st.Size()
		}
		os.Remove(f.tmp.Name())
		f.tmp.Close()
		f.tmp = nil
	}
	c := f.dir
	c.mu.Lock()
	if c.pending[f.name] == f {
		delete(c.pending, f.name)
		if result == nil {
			if c.finished == nil {
				c.finished = make(map[string]finishedImport)
			}
			c.finished[f.name] = finishedImport{f: f, until: time.Now().Add(importLinger)}
		}
	}
	c.mu.Unlock()
	switch {
	case result == nil:
		f.fsys.log.Printf("snapfs: imported volumes/%s", f.name)
	case result != errNothingWritten:
		f.fsys.log.Printf("snapfs: import %s failed, nothing imported: %v", f.name, result)
	}
}

// importHandle is an open import/NAME.
type importHandle struct {
	f     *importFile
	write bool // opened for writing: counts in f.writers
}

var (
	_ fusefs.FileReader   = (*importHandle)(nil)
	_ fusefs.FileWriter   = (*importHandle)(nil)
	_ fusefs.FileFlusher  = (*importHandle)(nil)
	_ fusefs.FileFsyncer  = (*importHandle)(nil)
	_ fusefs.FileReleaser = (*importHandle)(nil)
)

// Write implements [fusefs.FileWriter]: straight to the staging file, at
// the writer's offset.
func (h *importHandle) Write(_ context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	f := h.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return 0, f.fsys.errno("write import/"+f.name, err)
	}
	n, err := f.tmp.WriteAt(data, off)
	f.dirty = true
	if err != nil {
		return uint32(n), f.fsys.errno("write import/"+f.name, err)
	}
	return uint32(n), 0
}

// Read implements [fusefs.FileReader].
func (h *importHandle) Read(_ context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f := h.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.tmp == nil {
		return nil, syscall.EBADF
	}
	n, err := f.tmp.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, f.fsys.errno("read import/"+f.name, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Flush implements [fusefs.FileFlusher]: close(2) of the writer. The
// failure was logged by finish already.
func (h *importHandle) Flush(ctx context.Context) syscall.Errno {
	if !h.write {
		return 0
	}
	errno, _ := toErrno(h.f.flush(ctx))
	return errno
}

// Fsync implements [fusefs.FileFsyncer].
func (h *importHandle) Fsync(context.Context, uint32) syscall.Errno {
	f := h.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.tmp == nil {
		return 0
	}
	return f.fsys.errno("fsync import/"+f.name, f.tmp.Sync())
}

// Release implements [fusefs.FileReleaser].
func (h *importHandle) Release(context.Context) syscall.Errno {
	if h.write {
		h.f.release()
	}
	return 0
}
