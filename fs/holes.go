package fs

import (
	"context"
	"syscall"

	"golang.org/x/sys/unix"

	"snapfs/qcow"
)

// The whence values of lseek(2) that ask about holes.
const (
	seekData = unix.SEEK_DATA
	seekHole = unix.SEEK_HOLE
)

// extentWindow is how much of an image's allocation map is asked for at
// once when walking it: bounded, so that memory stays constant whatever the
// image size (a 1 TiB image fragmented cluster by cluster would have 16
// million extents), and large enough that a sparse image is crossed in a
// few calls.
const extentWindow = 256 << 20

// extentSource is an image's allocation map, read a window at a time
// (qcow.Image.Extents).
type extentSource func(off, length int64) ([]qcow.Extent, error)

// seekInExtents answers SEEK_DATA or SEEK_HOLE from off within one window of
// an allocation map: ext are sorted extents, ending where the window ends.
// Data extents are data; zero and unallocated extents, and any gap between
// extents, are holes, as they read as zeros. ok is false when the window
// holds no answer at or after off, and the search goes on in the next one.
func seekInExtents(ext []qcow.Extent, off int64, whence int) (pos int64, ok bool) {
	next := off // the first offset not yet classified
	for _, e := range ext {
		if e.End() <= next {
			continue
		}
		if e.Offset > next && whence == seekHole {
			return next, true // a gap in the map reads as zeros
		}
		next = max(next, e.Offset)
		isData := e.Kind == qcow.Data
		if isData == (whence == seekData) {
			return next, true
		}
		next = e.End()
	}
	return 0, false
}

// seekHoleData implements SEEK_DATA and SEEK_HOLE over an image of the
// given size, as lseek(2) does on a sparse file: the end of the file counts
// as a hole; an offset at or past the end, or SEEK_DATA with no data after
// off, is ENXIO.
func seekHoleData(ctx context.Context, src extentSource, size, off int64, whence int) (int64, error) {
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, syscall.ENXIO
	}
	for start := off; start < size; {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n := min(extentWindow, size-start)
		ext, err := src(start, n)
		if err != nil {
			return 0, err
		}
		if pos, ok := seekInExtents(ext, start, whence); ok && pos < start+n {
			return pos, nil
		}
		start += n
	}
	if whence == seekHole {
		return size, nil
	}
	return 0, syscall.ENXIO
}

// allocatedBytes sums the data extents of an image: what a sparse copy of
// its raw export takes on disk, for an honest st_blocks.
func allocatedBytes(ctx context.Context, src extentSource, size int64) (int64, error) {
	var total int64
	for start := int64(0); start < size; {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n := min(extentWindow, size-start)
		ext, err := src(start, n)
		if err != nil {
			return 0, err
		}
		for _, e := range ext {
			if e.Kind == qcow.Data {
				total += e.Length
			}
		}
		start += n
	}
	return total, nil
}

// blocks converts a byte count to 512-byte blocks (st_blocks), rounding up.
func blocks(bytes int64) uint64 { return uint64((bytes + 511) / 512) }
