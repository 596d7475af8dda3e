package fs

import (
	"context"
	"errors"
	"syscall"
	"testing"

	"snapfs/qcow"
)

// ext builds an extent; kinds: 'd' data, 'z' zero, 'u' unallocated.
func ext(off, length int64, kind byte) qcow.Extent {
	k := map[byte]qcow.ExtentKind{'d': qcow.Data, 'z': qcow.Zero, 'u': qcow.Unallocated}[kind]
	return qcow.Extent{Offset: off, Length: length, Kind: k}
}

func TestSeekInExtents(t *testing.T) {
	window := []qcow.Extent{
		ext(0, 10, 'u'),
		ext(10, 10, 'd'),
		ext(20, 5, 'd'), // data of another layer: still data
		ext(25, 5, 'z'),
		ext(30, 10, 'd'),
		ext(45, 5, 'd'), // a gap 40..45 reads as zeros
	}
	tests := []struct {
		name   string
		ext    []qcow.Extent
		off    int64
		whence int
		want   int64
		ok     bool
	}{
		{"data from a hole", window, 0, seekData, 10, true},
		{"data inside data", window, 12, seekData, 12, true},
		{"data from a zero extent", window, 26, seekData, 30, true},
		{"data from a gap", window, 41, seekData, 45, true},
		{"data past the last data", window, 50, seekData, 0, false},
		{"hole inside a hole", window, 3, seekHole, 3, true},
		{"hole skips adjacent data extents", window, 10, seekHole, 25, true},
		{"hole at a zero extent", window, 27, seekHole, 27, true},
		{"hole at a gap", window, 30, seekHole, 40, true},
		{"no hole after the last data", window, 46, seekHole, 0, false},
		{"empty window", nil, 0, seekData, 0, false},
		{"empty window hole", nil, 0, seekHole, 0, false},
		{"only data", []qcow.Extent{ext(0, 100, 'd')}, 50, seekHole, 0, false},
		{"only zeros", []qcow.Extent{ext(0, 100, 'z')}, 50, seekData, 0, false},
		{"gap before the first extent", []qcow.Extent{ext(10, 10, 'd')}, 0, seekHole, 0, true},
		{"data after a leading gap", []qcow.Extent{ext(10, 10, 'd')}, 0, seekData, 10, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := seekInExtents(tt.ext, tt.off, tt.whence)
			if ok != tt.ok || (ok && got != tt.want) {
				t.Errorf("seekInExtents(off %d, whence %d) = %d, %v; want %d, %v", tt.off, tt.whence, got, ok, tt.want, tt.ok)
			}
		})
	}
}

// windowedMap serves a fixed allocation map a window at a time, clipped
// to the window as qcow.Image.Extents does.
func windowedMap(all []qcow.Extent) (extentSource, *int) {
	calls := 0
	return func(off, length int64) ([]qcow.Extent, error) {
		calls++
		var out []qcow.Extent
		for _, e := range all {
			start, end := max(e.Offset, off), min(e.End(), off+length)
			if start < end {
				out = append(out, qcow.Extent{Offset: start, Length: end - start, Kind: e.Kind})
			}
		}
		return out, nil
	}, &calls
}

func TestSeekHoleData(t *testing.T) {
	const w = extentWindow
	size := int64(10 * w)
	// Data in the middle of window 3, crossing into window 4, and a
	// last bit at the very end of the image.
	all := []qcow.Extent{
		ext(0, 3*w+100, 'u'),
		ext(3*w+100, w, 'd'),
		ext(4*w+100, 6*w-200, 'z'),
		ext(size-100, 100, 'd'),
	}
	tests := []struct {
		name   string
		off    int64
		whence int
		want   int64
		err    error
	}{
		{"first data is windows away", 0, seekData, 3*w + 100, nil},
		{"hole after data crossing a window", 3*w + 100, seekHole, 4*w + 100, nil},
		{"data at the end", 4*w + 100, seekData, size - 100, nil},
		{"the end is a hole", size - 50, seekHole, size, nil},
		{"data at the last byte", size - 1, seekData, size - 1, nil},
		{"at the end: ENXIO", size, seekData, 0, syscall.ENXIO},
		{"hole at the end: ENXIO", size, seekHole, 0, syscall.ENXIO},
		{"negative offset", -1, seekData, 0, syscall.EINVAL},
		{"bad whence", 0, 0, 0, syscall.EINVAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, _ := windowedMap(all)
			got, err := seekHoleData(context.Background(), src, size, tt.off, tt.whence)
			if !errors.Is(err, tt.err) || (err == nil && got != tt.want) {
				t.Errorf("seekHoleData(off %d, whence %d) = %d, %v; want %d, %v", tt.off, tt.whence, got, err, tt.want, tt.err)
			}
		})
	}

	t.Run("no data after off", func(t *testing.T) {
		src, _ := windowedMap([]qcow.Extent{ext(0, w, 'd'), ext(w, 9*w, 'u')})
		if _, err := seekHoleData(context.Background(), src, size, w, seekData); !errors.Is(err, syscall.ENXIO) {
			t.Errorf("SEEK_DATA past the data: %v, want ENXIO", err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		src, _ := windowedMap(all)
		if _, err := seekHoleData(ctx, src, size, 0, seekData); !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled seek: %v", err)
		}
	})
}

func TestAllocatedBytes(t *testing.T) {
	const w = extentWindow
	all := []qcow.Extent{ext(0, 100, 'd'), ext(100, w, 'z'), ext(w+100, w, 'd'), ext(2*w+100, w-100, 'u')}
	src, calls := windowedMap(all)
	got, err := allocatedBytes(context.Background(), src, 3*w)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(100 + w); got != want {
		t.Errorf("allocatedBytes = %d, want %d", got, want)
	}
	if *calls != 3 {
		t.Errorf("allocatedBytes asked for %d windows, want 3", *calls)
	}
}
