// Package directio writes files with direct I/O (O_DIRECT) where it can:
// whole pages at page-aligned offsets go to the disk without passing
// through the page cache, and the rest through the page cache, which the
// kernel keeps coherent with them. Used where snapfs writes a large file
// once and syncs it (import staging files, copies of imported images):
// filling page-cache pages is what costs most there, and the sync finds
// little left to write.
package directio

import (
	"errors"
	"os"
	"syscall"
)

// Align is the alignment of a direct write's offset and length, and of
// its buffer: the page size, which every filesystem's direct I/O takes.
// Buffers from mmap are aligned to it.
const Align = 4096

// Writer writes to one file, directly where it can. It is not safe for
// concurrent use.
type Writer struct {
	f      *os.File
	direct *os.File // nil: through the page cache only
}

// NewWriter returns a Writer for f, the file's buffered descriptor, which
// stays the caller's: it opens a direct descriptor of the same file, when
// the filesystem takes O_DIRECT.
func NewWriter(f *os.File) *Writer {
	direct, err := os.OpenFile(f.Name(), os.O_WRONLY|syscall.O_DIRECT|syscall.O_NOFOLLOW, 0)
	if err != nil {
		direct = nil
	}
	return &Writer{f: f, direct: direct}
}

// Buffered returns a Writer for f that writes through the page cache only.
func Buffered(f *os.File) *Writer { return &Writer{f: f} }

// WriteAt writes p at off: its whole pages directly when off is aligned,
// a tail through the page cache. A filesystem that refuses an alignment
// after all (some check only at the first write: EINVAL) gets this and
// every later write through the page cache.
func (w *Writer) WriteAt(p []byte, off int64) error {
	if w.direct != nil && off%Align == 0 {
		if n := len(p) &^ (Align - 1); n > 0 {
			_, err := w.direct.WriteAt(p[:n], off)
			switch {
			case err == nil:
				p, off = p[n:], off+int64(n)
			case errors.Is(err, syscall.EINVAL):
				w.direct.Close()
				w.direct = nil
			default:
				return err
			}
		}
	}
	if len(p) == 0 {
		return nil
	}
	_, err := w.f.WriteAt(p, off)
	return err
}

// Close closes the direct descriptor, not the file's.
func (w *Writer) Close() error {
	if w.direct == nil {
		return nil
	}
	err := w.direct.Close()
	w.direct = nil
	return err
}
