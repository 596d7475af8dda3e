package fs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/snapshot"
)

// Restoring a snapshot folder: `cp -r backup/S MOUNT/import/`.
//
// A snapshot folder copied out of the mount (volumes/V/snapshots/S or
// instances/I/snapshots/S: meta.json and the disk files) and copied back
// into import/ is restored by snapshot.RestoreStaged: an instance folder
// becomes new volumes plus an instance with the same device mapping, a
// volume folder a new volume, with their snapshots and user metadata (see
// snapshot/restore.go for the names they get).
//
// mkdir in import/ makes a staging directory (staging_linux.go) that holds
// the folder under its name. Whatever is copied into it is kept there as
// it is: files (written like import/NAME, importFile), folders (since/),
// symbolic links (parent). The restore reads only meta.json and the disk
// files that meta.json names; the rest is dropped with the folder.
//
// # When the restore runs
//
// At the close of each file of the folder (and when a link is added), once
// no file of the folder is open for writing: if meta.json is there and names a disk file for each
// of its disks (snapshot.RestoreReady), the restore runs, in that close;
// its error is that close's error, so cp reports it, and the log has the
// whole message. A meta.json that is not valid fails the restore then
// too. Until then the folder waits: a restore needs every disk.
//
// The disk files are untrusted, as import/NAME is: the same checks refuse
// the same images, and a refusal creates nothing. The local store takes
// a staged qcow2 disk over by a rename rather than copying it (see
// snapshot.StagedImage), so a restore costs no second copy.
//
// # Afterwards
//
// Restored or failed, the folder stays in import/ for importLinger,
// read-only, its staged data gone: cp -r goes on copying what is left of
// the folder (disk.raw after disk.qcow2 was used), and cp -a sets the
// folder's times at the end. Files that arrive then are taken and dropped
// at their close (a log line says so). Then the folder leaves import/,
// and what is left of its staging directory goes with it; rm -r (rmdir)
// removes it at once, and abandons a folder that was not restored yet.
//
// Lock order: importFile.mu, then folderRestore.mu (one for the whole
// tree of a folder), then importContents.mu.

// folderRestore is a folder copied into import/ and its restore.
type folderRestore struct {
	c       *importContents
	name    string
	staging *stagingDir
	top     *importFolder

	mu sync.Mutex // protects the fields below and every importFolder.entries
	// writing counts the files with a writer whose close the folder has
	// not seen (importFile.open).
	writing int
	state   restoreState
	result  error       // of the restore, once restoreDone
	expire  *time.Timer // removes a finished folder
	gone    bool        // left import/
}

// restoreState is where a folder's restore is.
type restoreState int

const (
	restorePending restoreState = iota // waiting for its files
	restoreRunning                     // restoring: no changes
	restoreDone                        // restored or failed
)

// importFolder is a directory of a folder copied into import/: the folder
// itself, or one inside it.
type importFolder struct {
	*dir
	restore *folderRestore
	parent  *importFolder // nil for the folder itself
	path    string        // in the staging directory
	entries map[string]treeNode
}

var (
	_ fusefs.NodeSymlinker  = (*importFolder)(nil)
	_ fusefs.NodeSetattrer  = (*importFolder)(nil)
	_ fusefs.NodeSetxattrer = (*importFolder)(nil)
)

// newImportFolder returns the node of a directory of r, at path in the
// staging directory.
func (fsys *filesystem) newImportFolder(r *folderRestore, parent *importFolder, name string, parentID identity, path string) *importFolder {
	d := &importFolder{restore: r, parent: parent, path: path, entries: map[string]treeNode{}}
	now := time.Now()
	d.dir = fsys.newDir(name, parentID.versioned(name, now), d, true, now, 0)
	return d
}

// mkdir starts the restore of a folder copied into import/.
func (c *importContents) mkdir(ctx context.Context, name string) (treeNode, error) {
	if err := snapshot.CheckInstanceName(name); err != nil {
		return nil, err
	}
	if _, ok := c.fsys.backend.(snapshot.Restorer); !ok {
		return nil, fmt.Errorf("%w: backend %s cannot restore snapshot folders", snapshot.ErrUnsupported, c.fsys.backend.Name())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.taken(name); err != nil {
		return nil, err
	}
	staging, err := createStagingDir(c.fsys.staging, name)
	if err != nil {
		return nil, err
	}
	r := &folderRestore{c: c, name: name, staging: staging}
	r.top = c.fsys.newImportFolder(r, nil, name, c.id, staging.path)
	if c.folders == nil {
		c.folders = make(map[string]*folderRestore)
	}
	c.folders[name] = r
	delete(c.finished, name)
	return r.top, nil
}

// rmdir removes a folder from import/: it abandons one not restored yet.
func (c *importContents) rmdir(_ context.Context, name string) error {
	c.mu.Lock()
	r := c.folders[name]
	_, file := c.pending[name]
	c.mu.Unlock()
	switch {
	case r != nil:
		return r.remove()
	case file:
		return syscall.ENOTDIR
	}
	return notFound(name)
}

// mountPath is the folder's path in the mount, for messages.
func (d *importFolder) mountPath() string {
	if d.parent == nil {
		return "import/" + d.name
	}
	return d.parent.mountPath() + "/" + d.name
}

func (d *importFolder) list(context.Context) ([]treeNode, error) {
	d.restore.mu.Lock()
	defer d.restore.mu.Unlock()
	out := make([]treeNode, 0, len(d.entries))
	for _, e := range d.entries {
		out = append(out, e)
	}
	return out, nil
}

func (d *importFolder) find(_ context.Context, name string) (treeNode, error) {
	d.restore.mu.Lock()
	defer d.restore.mu.Unlock()
	if e, ok := d.entries[name]; ok {
		return e, nil
	}
	return nil, notFound(name)
}

// adding checks that name can be added to d. r.mu is held.
func (d *importFolder) adding(name string) error {
	r := d.restore
	switch {
	case r.gone:
		return notFound(d.name)
	case r.state == restoreRunning:
		return fmt.Errorf("%w: %s is being restored", snapshot.ErrBusy, r.top.mountPath())
	case d.entries[name] != nil:
		return fmt.Errorf("%w: %s/%s", snapshot.ErrExists, d.mountPath(), name)
	}
	return nil
}

// create adds a file to the folder.
func (d *importFolder) create(_ context.Context, name string) (treeNode, fusefs.FileHandle, error) {
	r := d.restore
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := d.adding(name); err != nil {
		return nil, nil, err
	}
	staged, err := createStagedIn(d.path, name)
	if err != nil {
		return nil, nil, fmt.Errorf("%s/%s: creating the staging file: %w", d.mountPath(), name, err)
	}
	f := d.fsys.newImportFile(name, d.id, staged)
	f.folder, f.open = d, true
	r.writing++
	d.entries[name] = f
	return f, &importHandle{f: f, write: true}, nil
}

// mkdir adds a folder to the folder (since/ of a volume snapshot).
func (d *importFolder) mkdir(_ context.Context, name string) (treeNode, error) {
	r := d.restore
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := d.adding(name); err != nil {
		return nil, err
	}
	path := filepath.Join(d.path, name)
	if err := os.Mkdir(path, 0o700); err != nil {
		return nil, err
	}
	sub := d.fsys.newImportFolder(r, d, name, d.id, path)
	d.entries[name] = sub
	return sub, nil
}

// Symlink implements [fusefs.NodeSymlinker]: a link copied with the
// folder (parent -> ../PREV) is kept as it is, in the staging directory,
// where the restore refuses it if it stands for a file it reads.
func (d *importFolder) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	if d.fsys.readOnly {
		return nil, syscall.EROFS
	}
	r := d.restore
	r.mu.Lock()
	err := d.adding(name)
	if err == nil {
		err = os.Symlink(target, filepath.Join(d.path, name))
	}
	var link *importLink
	if err == nil {
		now := time.Now()
		link = &importLink{d.fsys.newSymlink(name, d.id.versioned(name, now), now, func(context.Context) (string, error) { return target, nil })}
		d.entries[name] = link
	}
	r.mu.Unlock()
	if err == nil {
		// A link where the restore wants a file (a disk) completes the
		// folder as much as a file does, and the restore refuses it.
		mctx, cancel := d.fsys.steadyContext(ctx)
		err = r.closed(mctx, nil)
		cancel()
		if err != nil {
			errno, _ := toErrno(err)
			return nil, errno
		}
		var in *fusefs.Inode
		if in, err = newChild(context.WithoutCancel(ctx), d.EmbeddedInode(), link, out); err == nil {
			return in, 0
		}
	}
	return nil, d.fsys.errno("symlink "+d.mountPath()+"/"+name, err)
}

// Setattr implements [fusefs.NodeSetattrer]: mode, owner and times are
// accepted and ignored, as on the files, so that cp -a does not fail.
func (d *importFolder) Setattr(ctx context.Context, _ fusefs.FileHandle, _ *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if d.fsys.readOnly {
		return syscall.EROFS
	}
	return getattr(ctx, d, out)
}

// Setxattr implements [fusefs.NodeSetxattrer]: no extended attributes,
// and saying so (ENOTSUP) lets cp -a go on without them; go-fuse would
// answer ENODATA, an error to cp.
func (d *importFolder) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return syscall.ENOTSUP
}

// importLink is a symbolic link copied into a folder in import/.
type importLink struct{ *symlink }

var (
	_ fusefs.NodeSetattrer  = (*importLink)(nil)
	_ fusefs.NodeSetxattrer = (*importLink)(nil)
)

// Setattr implements [fusefs.NodeSetattrer]: owner and times are accepted
// and ignored (cp -a sets them).
func (l *importLink) Setattr(ctx context.Context, _ fusefs.FileHandle, _ *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, l, out)
}

// Setxattr implements [fusefs.NodeSetxattrer], as on importFolder.
func (l *importLink) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return syscall.ENOTSUP
}

// unlink removes a file or a link from the folder; a file not closed yet
// is abandoned.
func (d *importFolder) unlink(_ context.Context, name string) error {
	r := d.restore
	r.mu.Lock()
	e := d.entries[name]
	var err error
	switch e.(type) {
	case nil:
		err = notFound(name)
	case *importFolder:
		err = syscall.EISDIR
	default:
		if r.state == restoreRunning {
			err = fmt.Errorf("%w: %s is being restored", snapshot.ErrBusy, r.top.mountPath())
		}
	}
	if err == nil {
		delete(d.entries, name)
	}
	r.mu.Unlock()
	if err != nil {
		return err
	}
	switch e := e.(type) {
	case *importFile:
		e.mu.Lock()
		e.finish(fmt.Errorf("%w: abandoned (unlinked)", syscall.ENOENT))
		e.mu.Unlock()
	case *importLink:
		os.Remove(filepath.Join(d.path, name))
	}
	return nil
}

// rmdir removes an empty folder from the folder.
func (d *importFolder) rmdir(_ context.Context, name string) error {
	r := d.restore
	r.mu.Lock()
	defer r.mu.Unlock()
	sub, ok := d.entries[name].(*importFolder)
	switch {
	case d.entries[name] == nil:
		return notFound(name)
	case !ok:
		return syscall.ENOTDIR
	case len(sub.entries) > 0:
		return syscall.ENOTEMPTY
	case r.state == restoreRunning:
		return fmt.Errorf("%w: %s is being restored", snapshot.ErrBusy, r.top.mountPath())
	}
	delete(d.entries, name)
	os.Remove(sub.path)
	return nil
}

// files returns every file of the folder and of the folders in it. r.mu
// is held.
func (d *importFolder) files() []*importFile {
	var out []*importFile
	for _, e := range d.entries {
		switch e := e.(type) {
		case *importFile:
			out = append(out, e)
		case *importFolder:
			out = append(out, e.files()...)
		}
	}
	return out
}

// opened counts n more files open for writing.
func (r *folderRestore) opened(n int) {
	r.mu.Lock()
	r.writing += n
	r.mu.Unlock()
}

// writable says why the files of the folder take no writes, if they do
// not.
func (r *folderRestore) writable() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == restoreRunning {
		return fmt.Errorf("%w: %s is being restored", snapshot.ErrBusy, r.top.mountPath())
	}
	return nil
}

// closeInFolder is the close of file f of a folder: its writer is done.
// The folder restores itself if it can now (see the top of the file),
// and the restore's error is the close's. It is called with f.mu held,
// and unlocks it: the restore locks every file.
func (f *importFile) closeInFolder(ctx context.Context) error {
	err := f.staged.closeWrite()
	wasOpen := f.open
	f.open = false
	r := f.folder.restore
	f.mu.Unlock()
	if wasOpen {
		r.opened(-1)
	}
	if err != nil {
		f.mu.Lock()
		f.finish(fmt.Errorf("%s: %w", f.path(), err))
		f.mu.Unlock()
		return err
	}
	return r.closed(ctx, f)
}

// closed runs the restore if the folder is complete now that f is
// closed (or a link was added: f is nil); a file closed after the restore
// is dropped.
func (r *folderRestore) closed(ctx context.Context, f *importFile) error {
	r.mu.Lock()
	if r.state == restoreDone && f != nil {
		r.mu.Unlock()
		f.mu.Lock()
		if !f.done {
			f.done = true
			f.dropStaged()
			r.c.fsys.log.Printf("snapfs: %s arrived after the restore of %s: not used", f.path(), r.top.mountPath())
		}
		f.mu.Unlock()
		return nil
	}
	if r.state != restorePending || r.writing > 0 {
		r.mu.Unlock()
		return nil
	}
	ready, err := snapshot.RestoreReady(r.staging.path)
	if err == nil && !ready {
		r.mu.Unlock()
		return nil
	}
	r.state = restoreRunning
	if r.expire != nil {
		r.expire.Stop()
	}
	r.mu.Unlock()
	if err == nil {
		err = r.run(ctx)
	}
	r.finish(err)
	return err
}

// run restores the folder.
func (r *folderRestore) run(ctx context.Context) error {
	fsys := r.c.fsys
	restorer, ok := fsys.backend.(snapshot.Restorer)
	if !ok {
		return fmt.Errorf("%w: backend %s cannot restore snapshot folders", snapshot.ErrUnsupported, fsys.backend.Name())
	}
	res, err := snapshot.RestoreStaged(ctx, restorer, r.staging.path, snapshot.RestoreName(r.staging.path))
	if err != nil {
		return err
	}
	var vols []string
	for _, v := range res.Volumes {
		vols = append(vols, "volumes/"+v.Name)
	}
	what := strings.Join(vols, ", ")
	if res.Instance != nil {
		what = fmt.Sprintf("instances/%s over %s", res.Instance.Name, what)
	}
	fsys.log.Printf("snapfs: restored %s as %s", r.top.mountPath(), what)
	return nil
}

// finish ends the restore with result: every staged file goes (the store
// has taken over, or copied, what it restored), and the folder stays
// read-only for importLinger.
func (r *folderRestore) finish(result error) {
	r.mu.Lock()
	files := r.top.files()
	r.mu.Unlock()
	for _, f := range files {
		f.mu.Lock()
		if !f.done {
			f.done, f.result = true, result
			f.dropStaged()
		}
		f.mu.Unlock()
	}
	if result != nil {
		// The message names the files as the mount shows them.
		msg := strings.ReplaceAll(result.Error(), r.staging.top+"/", "import/")
		r.c.fsys.log.Printf("snapfs: restore of %s failed, nothing restored: %s", r.top.mountPath(), msg)
	}
	r.mu.Lock()
	r.state, r.result = restoreDone, result
	r.expire = time.AfterFunc(importLinger, r.expired)
	r.mu.Unlock()
}

// expired removes a finished folder from import/, once nothing writes in
// it any more.
func (r *folderRestore) expired() {
	r.mu.Lock()
	if r.gone {
		r.mu.Unlock()
		return
	}
	if r.writing > 0 {
		r.expire = time.AfterFunc(importLinger, r.expired)
		r.mu.Unlock()
		return
	}
	r.gone = true
	r.mu.Unlock()
	r.leave()
}

// remove is rmdir of the folder.
func (r *folderRestore) remove() error {
	r.mu.Lock()
	switch {
	case r.gone:
		r.mu.Unlock()
		return notFound(r.name)
	case r.state == restoreRunning:
		r.mu.Unlock()
		return fmt.Errorf("%w: %s is being restored", snapshot.ErrBusy, r.top.mountPath())
	case len(r.top.entries) > 0:
		r.mu.Unlock()
		return syscall.ENOTEMPTY
	}
	r.gone = true
	if r.expire != nil {
		r.expire.Stop()
	}
	pending := r.state == restorePending
	r.mu.Unlock()
	if pending {
		r.c.fsys.log.Printf("snapfs: %s abandoned (removed) before it was restored", r.top.mountPath())
	}
	r.leave()
	return nil
}

// leave takes the folder out of import/ and removes its staging
// directory. r.gone is set.
func (r *folderRestore) leave() {
	c := r.c
	c.mu.Lock()
	if c.folders[r.name] == r {
		delete(c.folders, r.name)
	}
	c.mu.Unlock()
	r.staging.remove()
}

// fileDone is the end of file f of the folder, with result (nil when it
// was used or dropped): an abandoned file leaves the folder. f.mu is
// held.
func (r *folderRestore) fileDone(f *importFile, result error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f.open {
		f.open = false
		r.writing--
	}
	if result == nil {
		return
	}
	if d := f.folder; d.entries[f.name] == f {
		delete(d.entries, f.name)
	}
	r.c.fsys.log.Printf("snapfs: %s: %v", f.path(), result)
}
