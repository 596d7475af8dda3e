package fs

import (
	"context"
	"encoding/json"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// jsonFile is a file that shows a model object as JSON: info.json,
// meta.json. What it shows can change (a new snapshot, a parent that went),
// so the kernel caches nothing: each open reads the model again, and reads
// are direct, so that the size given by an earlier stat does not matter.
type jsonFile struct {
	node
	// content returns the object to show and the file's mtime.
	content func(ctx context.Context) (any, time.Time, error)
}

var (
	_ fusefs.NodeGetattrer = (*jsonFile)(nil)
	_ fusefs.NodeOpener    = (*jsonFile)(nil)
	_ fusefs.NodeSetattrer = (*jsonFile)(nil)
)

func (f *filesystem) newJSONFile(name string, id identity, content func(context.Context) (any, time.Time, error)) *jsonFile {
	return &jsonFile{
		node: node{
			fsys:         f,
			name:         name,
			id:           id,
			mode:         syscall.S_IFREG | f.perm(true, false, false),
			entryTimeout: immutableTimeout,
		},
		content: content,
	}
}

// render returns the file's bytes: indented JSON and a newline, for
// people and jq alike.
func (j *jsonFile) render(ctx context.Context) ([]byte, time.Time, error) {
	v, mtime, err := j.content(ctx)
	if err != nil {
		return nil, time.Time{}, err
	}
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, time.Time{}, err
	}
	return append(data, '\n'), mtime, nil
}

func (j *jsonFile) attr(ctx context.Context, a *fuse.Attr) error {
	data, mtime, err := j.render(ctx)
	if err != nil {
		return err
	}
	j.fillAttr(a, int64(len(data)), int64(len(data)), mtime)
	return nil
}

// Getattr implements [fusefs.NodeGetattrer]. fstat of an open file
// describes the document its handle holds, which may be gone from the
// model (meta.json of a snapshot deleted meanwhile): its reader reads on.
func (j *jsonFile) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if h, ok := fh.(*bytesHandle); ok {
		j.fillAttr(&out.Attr, int64(len(h.data)), int64(len(h.data)), h.mtime)
		out.SetTimeout(j.attrTimeout)
		return 0
	}
	return getattr(ctx, j, out)
}

// Setattr implements [fusefs.NodeSetattrer]: the file is the model's.
func (j *jsonFile) Setattr(context.Context, fusefs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

// Open implements [fusefs.NodeOpener]: the handle keeps the bytes as they
// were at open, so that a reader sees one consistent document.
func (j *jsonFile) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	data, mtime, err := j.render(ctx)
	if err != nil {
		return nil, 0, j.fsys.errno("open "+j.name, err)
	}
	return &bytesHandle{data: data, mtime: mtime}, fuse.FOPEN_DIRECT_IO, 0
}

// bytesHandle is an open file whose content is in memory.
type bytesHandle struct {
	data  []byte
	mtime time.Time
}

var _ fusefs.FileReader = (*bytesHandle)(nil)

// Read implements [fusefs.FileReader].
func (b *bytesHandle) Read(_ context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(len(b.data)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(b.data[off:min(int64(len(b.data)), off+int64(len(dest)))]), 0
}
