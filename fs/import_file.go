package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
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
// (snapshot.OpenStaged) and handed to Backend.ImportVolume. The local
// store takes a qcow2 staging file over as the volume's base layer, by a
// rename, when the staging directory is on its filesystem (as `snapfs
// mount` puts it); it copies anything else. On success volumes/NAME
// appears. On failure close() returns the errno, the reason goes to the
// log (one line, with what to do), and nothing is created: every refused
// image (broken, hostile, with a backing or data file, encrypted, too
// large) is EINVAL, since the model's ImportError wraps
// snapshot.ErrInvalid; a full disk is ENOSPC; an import cut short is
// EINTR. Either way the staging file is removed.
//
// When a FLUSH comes (only from the writer's own close: closeOwners drops
// those of its forked children and of its execs):
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
// after they close it (rsync --inplace does), and must not fail then. It
// goes at once if volumes/NAME is deleted meanwhile: the name is free.
//
// A folder copied into import/ (cp -r) is restored instead: see
// import_dir.go. Its files are importFiles too, whose closes the folder
// sees (closeInFolder).
//
// Lock order: importFile.mu, then folderRestore.mu, then
// importContents.mu.

// importLinger is how long import/NAME stays after its import succeeded.
const importLinger = time.Minute

// importContents is import/: the imports being written.
type importContents struct {
	fsys *filesystem
	id   identity

	mu       sync.Mutex // protects the fields below
	pending  map[string]*importFile
	finished map[string]finishedImport
	folders  map[string]*folderRestore
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

// forgetDeleted forgets the finished imports among names whose volume is
// gone (snapfs volume delete NAME): the name is free again, so a new cp to
// import/NAME must start a new import rather than open the old file and
// fail with EEXIST until importLinger is over.
func (c *importContents) forgetDeleted(ctx context.Context, names map[string]*importFile) {
	for name, f := range names {
		if _, err := c.fsys.backend.Volume(ctx, name); !errors.Is(err, snapshot.ErrNotFound) {
			continue
		}
		c.mu.Lock()
		if fi, ok := c.finished[name]; ok && fi.f == f {
			delete(c.finished, name)
		}
		c.mu.Unlock()
	}
}

// finishedFiles returns the finished imports shown, by name (or only the
// one of that name, when name is not ""). c.mu is held.
func (c *importContents) finishedFiles(name string) map[string]*importFile {
	c.prune()
	out := make(map[string]*importFile)
	for n, fi := range c.finished {
		if name == "" || n == name {
			out[n] = fi.f
		}
	}
	return out
}

func (c *importContents) list(ctx context.Context) ([]treeNode, error) {
	c.mu.Lock()
	finished := c.finishedFiles("")
	c.mu.Unlock()
	c.forgetDeleted(ctx, finished)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.prune()
	out := make([]treeNode, 0, len(c.pending)+len(c.finished)+len(c.folders))
	for _, f := range c.pending {
		out = append(out, f)
	}
	for _, fi := range c.finished {
		out = append(out, fi.f)
	}
	for _, r := range c.folders {
		out = append(out, r.top)
	}
	return out, nil
}

func (c *importContents) find(ctx context.Context, name string) (treeNode, error) {
	c.mu.Lock()
	finished := c.finishedFiles(name)
	c.mu.Unlock()
	c.forgetDeleted(ctx, finished)
	c.mu.Lock()
	defer c.mu.Unlock()
	if f, ok := c.pending[name]; ok {
		return f, nil
	}
	if r, ok := c.folders[name]; ok {
		return r.top, nil
	}
	c.prune()
	if fi, ok := c.finished[name]; ok {
		return fi.f, nil
	}
	return nil, notFound(name)
}

// taken returns an error if name is in use in import/. c.mu is held.
func (c *importContents) taken(name string) error {
	if _, ok := c.pending[name]; ok {
		return fmt.Errorf("%w: import %q is being written", snapshot.ErrExists, name)
	}
	if _, ok := c.folders[name]; ok {
		return fmt.Errorf("%w: import/%s is a folder", snapshot.ErrExists, name)
	}
	return nil
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
	if err := c.taken(name); err != nil {
		return nil, nil, err
	}
	staged, err := createStaging(c.fsys.staging)
	if err != nil {
		return nil, nil, fmt.Errorf("import %s: creating the staging file: %w", name, err)
	}
	f := c.fsys.newImportFile(name, c.id, staged)
	f.dir = c
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
	_, folder := c.folders[name]
	c.mu.Unlock()
	if folder {
		return syscall.EISDIR
	}
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

// importFile is import/NAME while it is written, or a file of a folder
// copied into import/.
type importFile struct {
	node
	// dir is import/, for a file of its own; folder the folder that
	// holds the file otherwise. One of them is nil.
	dir     *importContents
	folder  *importFolder
	started time.Time

	// mu protects the fields below. It is held during the import itself,
	// so that no write slips in while the image is read.
	mu      sync.Mutex
	staged  *stagedFile   // nil once finished
	size    int64         // of the file when it finished
	writers int           // open handles that may write
	opening *importHandle // the writer opened last (Setattr's O_TRUNC)
	dirty   bool          // written or truncated since create
	done    bool          // imported, failed or abandoned: no more writes
	result  error         // of the import, once done
	// importing is closed when the import in progress ends; nil when
	// none is.
	importing chan struct{}
	// open is set while the file of a folder has a writer whose close the
	// folder has not seen yet (see closeInFolder).
	open bool
}

var (
	_ fusefs.NodeGetattrer  = (*importFile)(nil)
	_ fusefs.NodeSetattrer  = (*importFile)(nil)
	_ fusefs.NodeSetxattrer = (*importFile)(nil)
	_ fusefs.NodeOpener     = (*importFile)(nil)
)

// newImportFile returns the node of a file being written to staged, in the
// directory whose identity is parent, with its first writer.
func (fsys *filesystem) newImportFile(name string, parent identity, staged *stagedFile) *importFile {
	now := time.Now()
	return &importFile{
		node: node{
			fsys: fsys,
			name: name,
			// A new identity for every import: the inode of a
			// finished import must not be mistaken for the next.
			id:   parent.versioned(name, now),
			mode: syscall.S_IFREG | fsys.perm(true, true, false),
			// No caching: import/NAME goes when the import is done.
		},
		staged:  staged,
		started: now,
		writers: 1,
	}
}

func (f *importFile) attr(_ context.Context, a *fuse.Attr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var size, alloc int64
	if f.staged != nil {
		var err error
		if size, alloc, err = f.staged.stat(); err != nil {
			return err
		}
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
//
// O_TRUNC while another writer has the file open is refused (EBUSY): it
// is a second cp to the same name, whose image would be mixed with the
// first one's and imported as neither, with both cps reporting success.
func (f *importFile) Setattr(ctx context.Context, _ fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok {
		f.mu.Lock()
		err := f.writable()
		if err == nil && size == 0 && f.writers > 1 {
			err = fmt.Errorf("%w: %s is being written by another writer", snapshot.ErrBusy, f.path())
			if h := f.opening; h != nil && !h.refused && f.folder == nil {
				if caller, ok := fuse.FromContext(ctx); ok && caller.Pid == h.opener {
					h.refused = true
					f.writers--
				}
			}
		}
		if err == nil {
			err = f.staged.Truncate(int64(size))
			f.dirty = true
		}
		f.mu.Unlock()
		if err != nil {
			return f.fsys.errno("truncate "+f.path(), err)
		}
	}
	return getattr(ctx, f, out)
}

// Setxattr implements [fusefs.NodeSetxattrer]: no extended attributes,
// and saying so (ENOTSUP) lets cp -a go on without them (and set the mode
// instead of an ACL); go-fuse would answer ENODATA, an error to cp.
func (f *importFile) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return syscall.ENOTSUP
}

// Open implements [fusefs.NodeOpener]: a second writer, or a reader of
// what was written so far.
func (f *importFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.writable(); err != nil {
		return nil, 0, f.fsys.errno("open "+f.path(), err)
	}
	write := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	if write {
		if err := f.staged.openWrite(); err != nil {
			return nil, 0, f.fsys.errno("open "+f.path(), err)
		}
		if f.folder != nil && !f.open {
			f.folder.restore.opened(1)
			f.open = true
		}
		f.writers++
	}
	h := &importHandle{f: f, write: write}
	if write {
		// The kernel sends an O_TRUNC as a SETATTR of its own, without
		// the handle: Setattr finds it by its opener.
		if caller, ok := fuse.FromContext(ctx); ok {
			h.opener = caller.Pid
		}
		f.opening = h
	}
	return h, fuse.FOPEN_DIRECT_IO, 0
}

// path is the file's path in the mount, for messages.
func (f *importFile) path() string {
	if f.folder != nil {
		return f.folder.mountPath() + "/" + f.name
	}
	return "import/" + f.name
}

// writable says why the file takes no more writes, if it does not. f.mu is
// held.
func (f *importFile) writable() error {
	if f.importing != nil {
		return fmt.Errorf("%w: %s is being imported", snapshot.ErrBusy, f.path())
	}
	if !f.done {
		if f.folder != nil {
			return f.folder.restore.writable()
		}
		return nil
	}
	if f.result == nil {
		// Imported already: the name is taken (volumes/NAME exists),
		// as it is once import/NAME has gone. EBADF, which open(2)
		// never means, would read "Bad file descriptor" in cp.
		return fmt.Errorf("%w: %s was imported already", snapshot.ErrExists, f.path())
	}
	return f.result
}

// flush imports the file if this is the moment: see the comment at the
// top of the file.
func (f *importFile) flush(ctx context.Context) error {
	f.mu.Lock()
	f.waitImport()
	if f.done {
		defer f.mu.Unlock()
		return f.result
	}
	if !f.dirty || f.writers > 1 {
		f.mu.Unlock()
		return nil
	}
	if caller, ok := fuse.FromContext(ctx); ok {
		if failed, how := callerExitFailed(int(caller.Pid)); failed {
			defer f.mu.Unlock()
			f.finish(fmt.Errorf("import %s: abandoned: the writer (pid %d) %s before closing the file", f.name, caller.Pid, how))
			return f.result
		}
	}
	mctx, cancel := f.fsys.steadyContext(ctx)
	defer cancel()
	if f.folder != nil {
		return f.closeInFolder(mctx) // unlocks f.mu
	}
	defer f.mu.Unlock()
	f.importVolume(mctx)
	return f.result
}

// errNothingWritten ends an import whose writers wrote nothing.
var errNothingWritten = errors.New("nothing was written")

// release drops a writer; the last one imports what no flush did (the
// flushes came while another writer was open), or drops an empty file.
// Its errors can only be logged.
func (f *importFile) release(h *importHandle) {
	f.mu.Lock()
	if h.refused {
		f.mu.Unlock()
		return // counted out already
	}
	f.writers--
	if f.writers > 0 || f.done || f.importing != nil {
		f.mu.Unlock()
		return
	}
	mctx, cancel := context.WithCancel(f.fsys.ctx)
	defer cancel()
	if f.folder != nil {
		if f.open {
			// A file of a folder may be empty (touch): it is
			// complete all the same.
			if err := f.closeInFolder(mctx); err != nil {
				f.fsys.log.Printf("snapfs: %s: %v", f.path(), err)
			}
			return
		}
		f.mu.Unlock()
		return
	}
	defer f.mu.Unlock()
	if !f.dirty {
		f.finish(errNothingWritten)
		return
	}
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
	// The writer is done: nothing may write to the file any more, so
	// that the store can take it over (see snapshot.StagedImage). No
	// fsync: the store syncs what it keeps, and after a crash the
	// staging file is swept anyway.
	err := f.staged.closeWrite()
	path := f.staged.path
	f.mu.Unlock()

	if err == nil {
		var img *snapshot.StagedImage
		img, err = snapshot.OpenStaged(path)
		if err == nil {
			_, err = f.fsys.backend.ImportVolume(ctx, f.name, img, nil)
			img.Close()
		}
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
	f.dropStaged()
	if f.folder != nil {
		f.folder.restore.fileDone(f, result)
		return
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
	case result == errNothingWritten:
		// cp of an empty file, or touch: close(2) could not say so
		// (a shell's redirection closes before anything is written).
		f.fsys.log.Printf("snapfs: import %s: nothing was written, so nothing was imported", f.name)
	default:
		f.fsys.log.Printf("snapfs: import %s failed, nothing imported: %v", f.name, result)
	}
}

// dropStaged removes the staging file, keeping its size for stat. f.mu
// is held.
func (f *importFile) dropStaged() {
	if f.staged == nil {
		return
	}
	if size, _, err := f.staged.stat(); err == nil {
		f.size = size
	}
	f.staged.drop()
	f.staged = nil
}

// importHandle is an open import/NAME.
type importHandle struct {
	f     *importFile
	write bool // opened for writing: counts in f.writers, unless refused
	// opener is the thread that opened the handle (the FUSE caller).
	opener uint32
	// refused is set, under f.mu, when the truncation of the open that
	// made this handle (a second cp's O_TRUNC) was refused because
	// another writer has the file: that open fails, and the handle no
	// longer counts as a writer at once, since its release may come
	// after the first writer's close, whose import must not wait for it.
	refused bool
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
	err := f.writable()
	if err == nil && h.refused {
		err = fmt.Errorf("%w: %s is being written by another writer", snapshot.ErrBusy, f.path())
	}
	if err != nil {
		return 0, f.fsys.errno("write "+f.path(), err)
	}
	n, err := f.staged.WriteAt(data, off)
	f.dirty = true
	if err != nil {
		return uint32(n), f.fsys.errno("write "+f.path(), err)
	}
	return uint32(n), 0
}

// Read implements [fusefs.FileReader].
func (h *importHandle) Read(_ context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f := h.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.staged == nil {
		return nil, syscall.EBADF
	}
	n, err := f.staged.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, f.fsys.errno("read "+f.path(), err)
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
	if f.staged == nil {
		return 0
	}
	return f.fsys.errno("fsync "+f.path(), f.staged.Sync())
}

// Release implements [fusefs.FileReleaser].
func (h *importHandle) Release(context.Context) syscall.Errno {
	if h.write {
		h.f.release(h)
	}
	return 0
}
