package snapshot

import (
	"context"
	"errors"
	"io"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"snapfs/internal/directio"
	"snapfs/qcow"
)

// copyFile copies the file of img, an image OpenUntrusted opened that the
// store can keep as it is (adoptable), into a new layer of the store, byte
// for byte, and returns it; it returns nil, and no error, when img is to be
// converted instead (see keepsAsIs).
//
// A copy of the file costs less than a conversion of the image: the
// file's holes stay holes, no qcow2 is decoded or encoded, and the writes
// bypass the page cache (see copySparse). The copy is then checked again
// as the file was, so that the bytes kept are the bytes checked whatever
// happened to the file meanwhile. progress sees the bytes of the file
// copied.
func (s *LocalStore) copyFile(ctx context.Context, img qcow.Image, size int64, progress func(done, total int64)) (*newFile, error) {
	fi, ok := img.(*fileImage)
	if !ok || adoptable(fi.Image, size) != nil {
		return nil, nil
	}
	src, ok := fi.file.(sourceFile)
	if !ok {
		return nil, nil
	}
	st, err := src.Stat()
	if err != nil {
		return nil, err
	}
	if !keepsAsIs(st, size) {
		return nil, nil
	}
	nf, err := s.createFile(newLayerName(), true)
	if err != nil {
		return nil, err
	}
	if err := nf.f.Truncate(st.Size()); err != nil {
		// A file larger than this filesystem takes (ext4: 16 TiB),
		// however sparse: a conversion writes only the data.
		nf.discard()
		return nil, nil
	}
	if err := copySparse(ctx, nf.f, src, st.Size(), progress); err != nil {
		nf.discard()
		return nil, err
	}
	if err := checkKept(ctx, nf.path, fi.path, size); err != nil {
		nf.discard()
		return nil, err
	}
	return nf, nil
}

// sourceFile is what copyFile needs of the file an image was opened from:
// qcow.OpenFile's files have it. Seek only looks for data (SEEK_DATA,
// SEEK_HOLE): the image reads at offsets and does not mind.
type sourceFile interface {
	io.ReaderAt
	io.Seeker
	Stat() (os.FileInfo, error)
}

// keepsAsIs says whether a qcow2 file of virtual size size, with stat st,
// is worth copying as it is: a regular file that holds, and spans, little
// beyond its clusters. A file padded with data no table refers to (leaked
// clusters, or junk appended by a hostile image), or sparse far past them,
// is converted instead, which writes only the guest's data. The slack is
// for tables: an L2 entry per 64 KiB cluster is 1/8192 of the data, less
// than 1/64 with the smallest clusters (512 bytes).
func keepsAsIs(st os.FileInfo, size int64) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || !st.Mode().IsRegular() {
		return false
	}
	most := size + size/32 + copySlack
	return sys.Blocks*512 <= most && st.Size() <= most
}

// copySlack is what a kept file may hold beyond its share of tables: the
// header, a refcount table and blocks, and a few clusters qemu leaves.
const copySlack = 16 << 20

// copySparse copies the first size bytes of src into dst, an empty file
// already truncated to size, leaving holes where src has them. One
// goroutine reads src through the page cache while another writes what it
// read, so that both the reads and the writes keep the disk busy.
//
// The writes are direct (internal/directio) where the filesystem takes
// them: no
// page cache is filled for the copy, and the store's fsync finds nothing
// left to write. On this project's test machines (VMs), filling new page
// cache pages in small pieces was the costliest step of all: the first
// copy_file_range version, which the kernel runs 4 KiB at a time,
// spent 6.7 s of CPU copying 2 GiB (perf: memcpy in generic_perform_write).
func copySparse(ctx context.Context, dst *os.File, src sourceFile, size int64, progress func(done, total int64)) error {
	w := directio.NewWriter(dst)
	defer w.Close()
	free := make(chan []byte, copyBuffers)
	for range copyBuffers {
		buf, err := syscall.Mmap(-1, 0, copyBufSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
		if err != nil {
			return err
		}
		defer syscall.Munmap(buf)
		free <- buf
	}
	full := make(chan copyPiece, copyBuffers)
	var failed atomic.Bool
	written := make(chan error, 1)
	go func() {
		var err error
		for p := range full {
			if err == nil {
				if err = w.WriteAt(p.buf[:p.n], p.off); err != nil {
					failed.Store(true)
				} else if progress != nil {
					progress(p.off+int64(p.n), size)
				}
			}
			free <- p.buf
		}
		written <- err
	}()
	err := readPieces(ctx, src, size, free, full, &failed)
	close(full)
	if werr := <-written; werr != nil {
		return werr
	}
	return err
}

// copyBufSize is the size of one read and one write of copySparse, and
// copyBuffers how many are in flight.
const (
	copyBufSize = 4 << 20
	copyBuffers = 3
)

// copyPiece is what copySparse read and is to write: buf[:n] at off.
type copyPiece struct {
	buf []byte
	n   int
	off int64
}

// readPieces reads the data of src up to size into buffers from free and
// sends them to full, in order, until the end, an error, ctx is done or
// the writer failed.
func readPieces(ctx context.Context, src sourceFile, size int64, free chan []byte, full chan<- copyPiece, failed *atomic.Bool) error {
	for off := int64(0); off < size; {
		start, end, err := nextData(src, off, size)
		if err != nil {
			return err
		}
		for start < end {
			if err := ctx.Err(); err != nil {
				return err
			}
			if failed.Load() {
				return nil // the writer's error is the one to report
			}
			buf := <-free
			n := int(min(int64(len(buf)), end-start))
			if _, err := src.ReadAt(buf[:n], start); err != nil {
				free <- buf
				if err == io.EOF {
					err = io.ErrUnexpectedEOF // the file shrank under the copy
				}
				return err
			}
			full <- copyPiece{buf: buf, n: n, off: start}
			start += int64(n)
		}
		off = end
	}
	return ctx.Err()
}

// nextData returns the first run of data in src at or after off, up to
// size: [start, end), empty (start == end == size) when only a hole is
// left. A filesystem that does not know holes has one run: the rest.
func nextData(src io.Seeker, off, size int64) (start, end int64, err error) {
	start, err = src.Seek(off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return size, size, nil
	case errors.Is(err, syscall.EINVAL):
		return off, size, nil // no SEEK_DATA here
	case err != nil:
		return 0, 0, err
	}
	if start >= size {
		return size, size, nil
	}
	end, err = src.Seek(start, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, err
	}
	return start, min(end, size), nil
}
