package qcow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
)

// ConvertOptions say how Convert writes.
type ConvertOptions struct {
	// Format of the output: FormatRaw (sparse) or FormatQcow2 (version 3).
	Format Format
	// Compression compresses every data cluster that gets smaller (qcow2
	// only); nil writes uncompressed clusters.
	Compression *Compression
	// ClusterSize of a qcow2 output; 0 means 64 KiB.
	ClusterSize int64
	// Base, when set, makes a qcow2 overlay that holds only the clusters of
	// src that read differently from Base (both are read to compare).
	Base Image
	// Delta, when set, makes a qcow2 overlay that holds only these ranges
	// of src (see ExportOptions.Delta); nothing is compared.
	Delta []Extent
	// BackingName and BackingFormat are recorded as the backing file of an
	// overlay (qcow2 only).
	BackingName   string
	BackingFormat string
	// Compress deflates clusters (DefaultCompressor when nil).
	Compress Compressor
	// Progress, when set, is called now and then with the guest bytes done
	// out of the total to do.
	Progress func(done, total int64)
}

// copyChunk is the unit of work of the copy loops.
const copyChunk = 1 << 20

// Convert writes src, flattened, to dst, which should be empty: as a sparse
// raw file (holes wherever src reads zeros), or as a qcow2 version 3 image
// that `qemu-img check` finds clean. dst is not synced or closed.
func Convert(ctx context.Context, dst *os.File, src Image, opts ConvertOptions) error {
	switch opts.Format {
	case FormatRaw:
		if opts.Compression != nil || opts.Base != nil || opts.Delta != nil || opts.BackingName != "" {
			return fmt.Errorf("%w: raw output takes no compression, base or backing file", ErrUnsupported)
		}
		return convertRaw(ctx, dst, src, opts.Progress)
	case FormatQcow2:
		if opts.Base != nil && opts.Delta != nil {
			return fmt.Errorf("%w: give Base or Delta, not both", ErrUnsupported)
		}
		if opts.Compression != nil || opts.Base != nil {
			return writeStream(ctx, dst, src, opts)
		}
		e, err := NewExport(src, ExportOptions{ClusterSize: opts.ClusterSize, BackingName: opts.BackingName,
			BackingFormat: opts.BackingFormat, Delta: opts.Delta})
		if err != nil {
			return err
		}
		return copyExport(ctx, dst, e, opts.Progress)
	}
	return fmt.Errorf("%w: output format %v", ErrUnsupported, opts.Format)
}

// CreateOverlay writes an empty qcow2 v3 image of the given virtual size to
// dst, backed by backingName when it is not empty. clusterSize 0 means 64 KiB.
func CreateOverlay(dst *os.File, size, clusterSize int64, backingName, backingFormat string) error {
	return Convert(context.Background(), dst, emptyImage(size), ConvertOptions{Format: FormatQcow2,
		ClusterSize: clusterSize, BackingName: backingName, BackingFormat: backingFormat, Delta: []Extent{}})
}

// ExtentsAbove keeps the extents owned by layers above depth (Layer <
// depth): what the top layers of a chain change over the chain that starts
// at layer depth.
func ExtentsAbove(ext []Extent, depth int) []Extent {
	out := []Extent{}
	for _, e := range ext {
		if e.Layer < depth {
			out = append(out, e)
		}
	}
	return out
}

// emptyImage reads as zeros and has nothing allocated.
type emptyImage int64

func (e emptyImage) Size() int64  { return int64(e) }
func (e emptyImage) Close() error { return nil }
func (e emptyImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(e) {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), int64(e)-off))
	clear(p[:n])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (e emptyImage) Extents(off, length int64) ([]Extent, error) {
	return []Extent{{Offset: off, Length: min(length, int64(e)-off), Kind: Unallocated}}, nil
}

// parallelCopy runs copyOne over [0, total) in chunks, on as many workers as
// there are CPUs (at least 2, so that I/O overlaps), stopping at the first
// error or when ctx is done.
func parallelCopy(ctx context.Context, chunks []span, total int64, progress func(done, total int64), copyOne func(buf []byte, s span) error) error {
	workers := copyWorkers()
	var next, done atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, copyChunk)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(chunks)) {
					return
				}
				mu.Lock()
				stop := firstErr != nil
				mu.Unlock()
				if err := ctx.Err(); err != nil || stop {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				if err := copyOne(buf[:chunks[i].length], chunks[i]); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				d := done.Add(chunks[i].length)
				if progress != nil {
					progress(d, total)
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// span is a byte range.
type span struct{ offset, length int64 }

// chunkSpans cuts ranges into pieces of at most copyChunk bytes.
func chunkSpans(ranges []span) ([]span, int64) {
	var out []span
	var total int64
	for _, r := range ranges {
		for off := r.offset; off < r.offset+r.length; off += copyChunk {
			out = append(out, span{off, min(copyChunk, r.offset+r.length-off)})
		}
		total += r.length
	}
	return out, total
}

// convertRaw writes the data extents of src into a sparse file.
func convertRaw(ctx context.Context, dst *os.File, src Image, progress func(done, total int64)) error {
	if err := dst.Truncate(src.Size()); err != nil {
		return err
	}
	ext, err := src.Extents(0, src.Size())
	if err != nil {
		return err
	}
	var ranges []span
	for _, e := range mergeKinds(ext) {
		if e.Kind == Data {
			ranges = append(ranges, span{e.Offset, e.Length})
		}
	}
	chunks, total := chunkSpans(ranges)
	return parallelCopy(ctx, chunks, total, progress, func(buf []byte, s span) error {
		if err := readFull(src, buf, s.offset); err != nil {
			return err
		}
		if allZero(buf) {
			return nil // leave a hole
		}
		_, err := dst.WriteAt(buf, s.offset)
		return err
	})
}

// copyExport writes the bytes of a virtual export to dst; runs of zeros in
// the data stay holes.
func copyExport(ctx context.Context, dst *os.File, e *Export, progress func(done, total int64)) error {
	if err := dst.Truncate(e.Size()); err != nil {
		return err
	}
	chunks, total := chunkSpans([]span{{0, e.Size()}})
	return parallelCopy(ctx, chunks, total, progress, func(buf []byte, s span) error {
		if err := e.read(buf, s.offset); err != nil {
			return err
		}
		if allZero(buf) {
			return nil
		}
		_, err := dst.WriteAt(buf, s.offset)
		return err
	})
}

var zeroChunk = make([]byte, copyChunk)

func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:n], zeroChunk[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// copyWorkers is how many chunks are in flight at once: enough to keep a
// disk's queue busy when the page cache is cold, and every CPU busy
// compressing when it is warm.
func copyWorkers() int { return max(8, runtime.GOMAXPROCS(0)) }
