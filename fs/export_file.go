package fs

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// exportKind is the format a snapshot is exported in.
type exportKind int

const (
	exportRaw   exportKind = iota // disk.raw: the flattened image, sparse
	exportQcow2                   // disk.qcow2: a qcow2 file computed on read
	exportSince                   // since/FROM.qcow2: a qcow2 overlay of what changed since FROM
)

// exportFile is disk.raw or disk.qcow2 of a snapshot (or vda.raw, vda.qcow2
// of an instance snapshot). A snapshot never changes, so its exports never
// do: the kernel may keep their attributes, the size and allocation are
// computed once per node, and what a sequential reader will read next is
// read ahead (readahead.go).
type exportFile struct {
	node
	ref     snapshot.SnapshotRef
	kind    exportKind
	created time.Time
	// disk is set for a disk of an instance snapshot, read through the
	// instance provider when it has its own reader (instance_disk.go).
	disk *instanceDisk
	// since is the older snapshot an exportSince file is an overlay on.
	since string

	mu       sync.Mutex // protects the fields below; held while they are computed
	statDone bool
	size     int64 // of the file
	alloc    int64 // bytes of the file that hold data, for st_blocks
	// spare is the export that stat opened, kept for a moment for the
	// open that usually follows (cp, cat: stat, then open), which then
	// need not open the chain again (for RBD, every image of a clone
	// chain, and its map of who owns what). A timer closes it if no
	// open comes.
	spare *openedExport
}

// openedExport is an export opened: img must be closed, r reads the file.
type openedExport struct {
	img   qcow.Image
	r     io.ReaderAt
	size  int64
	timer *time.Timer
}

// spareFor is how long an export opened by stat waits for an open.
const spareFor = 2 * time.Second

var (
	_ fusefs.NodeGetattrer = (*exportFile)(nil)
	_ fusefs.NodeOpener    = (*exportFile)(nil)
	_ fusefs.NodeSetattrer = (*exportFile)(nil)
)

func (f *filesystem) newExportFile(name string, id identity, ref snapshot.SnapshotRef, created time.Time, kind exportKind) *exportFile {
	return &exportFile{
		node: node{
			fsys:         f,
			name:         name,
			id:           id,
			mode:         syscall.S_IFREG | f.perm(true, false, false),
			entryTimeout: immutableTimeout,
			attrTimeout:  immutableTimeout,
		},
		ref:     ref,
		kind:    kind,
		created: created,
	}
}

// open opens the export: the snapshot's flattened image, and for qcow2 the
// virtual qcow2 file over it. r reads the file; img must be closed.
func (e *exportFile) open(ctx context.Context) (img qcow.Image, r io.ReaderAt, size int64, err error) {
	if e.kind == exportSince {
		x, err := snapshot.IncrementalExport(ctx, e.fsys.backend, e.ref.Volume, e.since, e.ref.Snapshot)
		if err != nil {
			return nil, nil, 0, err
		}
		return x.Image(), x.Export, x.Size(), nil
	}
	img, err = e.openImage(ctx)
	if err != nil {
		return nil, nil, 0, err
	}
	if e.kind == exportRaw {
		return img, img, img.Size(), nil
	}
	x, err := qcow.NewExport(img, qcow.ExportOptions{})
	if err != nil {
		img.Close()
		return nil, nil, 0, err
	}
	return img, x, x.Size(), nil
}

// stat computes the size and allocation of the file, once.
func (e *exportFile) stat(ctx context.Context) (size, alloc int64, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.statDone {
		return e.size, e.alloc, nil
	}
	img, r, size, err := e.open(ctx)
	if err != nil {
		return 0, 0, err
	}
	if x, ok := r.(*qcow.Export); ok {
		alloc = x.AllocatedBytes()
	} else {
		alloc, err = allocatedBytes(ctx, img.Extents, size)
		if err != nil {
			img.Close()
			return 0, 0, err
		}
	}
	e.size, e.alloc, e.statDone = size, alloc, true
	e.spare = &openedExport{img: img, r: r, size: size}
	e.spare.timer = time.AfterFunc(spareFor, e.dropSpare)
	e.fsys.spares.add(e)
	return size, alloc, nil
}

// openExport returns the export that stat opened, if it still waits, or
// opens it.
func (e *exportFile) openExport(ctx context.Context) (img qcow.Image, r io.ReaderAt, size int64, err error) {
	if spare := e.takeSpare(); spare != nil {
		return spare.img, spare.r, spare.size, nil
	}
	return e.open(ctx)
}

// takeSpare returns the export stat opened, now the caller's, or nil.
func (e *exportFile) takeSpare() *openedExport {
	e.mu.Lock()
	spare := e.spare
	e.spare = nil
	e.mu.Unlock()
	if spare != nil {
		spare.timer.Stop()
		e.fsys.spares.remove(e)
	}
	return spare
}

// dropSpare closes the export stat opened, if no open took it.
func (e *exportFile) dropSpare() {
	if spare := e.takeSpare(); spare != nil {
		spare.img.Close()
	}
}

// spareExports is the set of export files that hold an export stat opened.
type spareExports struct {
	mu    sync.Mutex
	files map[*exportFile]struct{}
}

func (s *spareExports) add(e *exportFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.files == nil {
		s.files = map[*exportFile]struct{}{}
	}
	s.files[e] = struct{}{}
}

func (s *spareExports) remove(e *exportFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.files, e)
}

// closeAll closes every export still waiting for an open: the mount is
// gone, and the backend they read is closed next.
func (s *spareExports) closeAll() {
	s.mu.Lock()
	files := make([]*exportFile, 0, len(s.files))
	for e := range s.files {
		files = append(files, e)
	}
	s.mu.Unlock()
	for _, e := range files {
		e.dropSpare()
	}
}

func (e *exportFile) attr(ctx context.Context, a *fuse.Attr) error {
	size, alloc, err := e.stat(ctx)
	if err != nil {
		return err
	}
	e.fillAttr(a, size, alloc, e.created)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (e *exportFile) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, e, out)
}

// Setattr implements [fusefs.NodeSetattrer]: snapshots are immutable.
func (e *exportFile) Setattr(context.Context, fusefs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

// Open implements [fusefs.NodeOpener]. The open file holds its snapshot
// (snapshot.Manager.Hold): rmdir gets EBUSY until it is released.
func (e *exportFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	release, err := e.hold(ctx)
	if err != nil {
		return nil, 0, e.fsys.errno("open "+e.name, err)
	}
	img, r, size, err := e.openExport(ctx)
	if err != nil {
		release()
		return nil, 0, e.fsys.errno("open "+e.name, err)
	}
	h := &imageHandle{fsys: e.fsys, name: e.name, img: img, r: r, size: func() int64 { return size }, extents: allData}
	if e.kind == exportRaw {
		h.extents = img.Extents
	}
	h.release = release
	h.ref = &e.ref
	h.ra = newReadahead(r, size, raPool)
	// Direct I/O, although a snapshot never changes and its pages could
	// be kept: a cached read costs the kernel a copy into new page-cache
	// pages, and filling new pages is what limits a streamed export (on
	// the VMs this was measured on, more than the disk). Read-ahead is
	// done here instead (readahead.go), several chunks in flight, and
	// replies go from its buffers straight into the reader's.
	return h, fuse.FOPEN_DIRECT_IO, 0
}

// headFile is volumes/VOL/head.raw: the live head, flattened. It changes
// under the reader, so nothing of it is cached: reads are direct and
// attributes are asked for each time.
type headFile struct {
	node
	volume string
}

var (
	_ fusefs.NodeGetattrer = (*headFile)(nil)
	_ fusefs.NodeOpener    = (*headFile)(nil)
	_ fusefs.NodeSetattrer = (*headFile)(nil)
)

func (f *filesystem) newHeadFile(id identity, volume string) *headFile {
	return &headFile{
		node: node{
			fsys:         f,
			name:         "head.raw",
			id:           id,
			mode:         syscall.S_IFREG | f.perm(true, false, false),
			entryTimeout: immutableTimeout,
		},
		volume: volume,
	}
}

func (h *headFile) attr(ctx context.Context, a *fuse.Attr) error {
	v, err := h.fsys.backend.Volume(ctx, h.volume)
	if err != nil {
		return err
	}
	img, err := h.fsys.backend.OpenHead(ctx, h.volume)
	if err != nil {
		return err
	}
	defer img.Close()
	alloc, err := allocatedBytes(ctx, img.Extents, img.Size())
	if err != nil {
		return err
	}
	h.fillAttr(a, img.Size(), alloc, headMtime(v))
	return nil
}

// Getattr implements [fusefs.NodeGetattrer].
func (h *headFile) Getattr(ctx context.Context, _ fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return getattr(ctx, h, out)
}

// Setattr implements [fusefs.NodeSetattrer]: the head is written by the
// VM that runs off its file (info.json's head_path), not through the mount.
func (h *headFile) Setattr(context.Context, fusefs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

// Open implements [fusefs.NodeOpener].
func (h *headFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	img, err := h.fsys.backend.OpenHead(ctx, h.volume)
	if err != nil {
		return nil, 0, h.fsys.errno("open "+h.name, err)
	}
	return &imageHandle{fsys: h.fsys, name: h.name, img: img, r: img, size: img.Size, extents: img.Extents}, fuse.FOPEN_DIRECT_IO, 0
}

// imageHandle is an open export or head: reads go straight to the image,
// with the buffer go-fuse gives, so memory does not grow with the image.
type imageHandle struct {
	fsys *filesystem
	name string
	img  qcow.Image
	r    io.ReaderAt
	// size is the file's size now (the head's can change).
	size func() int64
	// extents is the allocation map for SEEK_HOLE and SEEK_DATA; allData
	// for a file with no holes to tell of (disk.qcow2 holds data only).
	extents extentSource
	release func()
	// ra reads ahead for sequential readers of an immutable export; nil
	// for the head, whose data may change between two reads.
	ra   *readahead
	once sync.Once
	// ref is the snapshot the file belongs to (nil for the head), and
	// flushed says whether it was closed once: see closingFiles.
	ref     *snapshot.SnapshotRef
	flushed atomic.Bool
}

var (
	_ fusefs.FileReader   = (*imageHandle)(nil)
	_ fusefs.FileLseeker  = (*imageHandle)(nil)
	_ fusefs.FileReleaser = (*imageHandle)(nil)
	_ fusefs.FileFlusher  = (*imageHandle)(nil)
)

// Flush implements [fusefs.FileFlusher]: close(2), maybe of one of several
// descriptors of the file. The release follows soon if it was the last.
func (h *imageHandle) Flush(context.Context) syscall.Errno {
	if h.ref != nil && !h.flushed.Swap(true) {
		h.fsys.closing.add(*h.ref, 1)
	}
	return 0
}

// Read implements [fusefs.FileReader].
func (h *imageHandle) Read(_ context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := h.size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	dest = dest[:min(int64(len(dest)), size-off)]
	if h.ra != nil {
		res, err := h.ra.read(dest, off)
		if err != nil {
			return nil, h.fsys.errno("read "+h.name, err)
		}
		return res, 0
	}
	n, err := h.r.ReadAt(dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
		return nil, h.fsys.errno("read "+h.name, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Lseek implements [fusefs.FileLseeker]: SEEK_DATA and SEEK_HOLE from the
// allocation map, so that cp --sparse, rsync -S and tar -S skip the holes
// without reading them.
func (h *imageHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	ctx, cancel := h.fsys.steadyContext(ctx)
	defer cancel()
	pos, err := seekHoleData(ctx, h.extents, h.size(), int64(off), int(whence))
	if err != nil {
		return 0, h.fsys.errno("lseek "+h.name, err)
	}
	return uint64(pos), 0
}

// Release implements [fusefs.FileReleaser].
func (h *imageHandle) Release(context.Context) syscall.Errno {
	h.once.Do(func() {
		if h.ra != nil {
			h.ra.close()
		}
		if err := h.img.Close(); err != nil {
			h.fsys.log.Printf("snapfs: close %s: %v", h.name, err)
		}
		if h.release != nil {
			h.release()
		}
		if h.ref != nil && h.flushed.Load() {
			h.fsys.closing.add(*h.ref, -1)
		}
	})
	return 0
}

// allData is the allocation map of a file without holes.
func allData(off, length int64) ([]qcow.Extent, error) {
	return []qcow.Extent{{Offset: off, Length: length, Kind: qcow.Data}}, nil
}
