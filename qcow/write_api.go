package qcow

import (
	"context"
	"errors"
	"os"
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
	// Base, when set, makes a qcow2 overlay holding only the clusters of src
	// that differ from Base; BackingName is then recorded as its backing file.
	Base          Image
	BackingName   string
	BackingFormat string
	// Progress, when set, is called now and then with the guest bytes done.
	Progress func(done, total int64)
}

// Convert writes src, flattened, to dst, which must be empty.
func Convert(ctx context.Context, dst *os.File, src Image, opts ConvertOptions) error {
	return errors.New("TODO")
}

// ExportOptions say what NewExport serves.
type ExportOptions struct {
	// ClusterSize of the export; 0 means 64 KiB.
	ClusterSize int64
	// BackingName and BackingFormat, when set, make the export an overlay
	// named after its backing file.
	BackingName   string
	BackingFormat string
	// Delta lists the ranges of src to store (Data or Zero; others are
	// skipped). Nil means all of src.Extents. For an overlay, it is what
	// differs from the backing file: see ExtentsAbove.
	Delta []Extent
}

// Export is a virtual qcow2 file over an image: its bytes are computed on
// read, never written anywhere. It is safe for concurrent use.
type Export struct{}

// NewExport lays out a qcow2 file over src. It reads metadata only.
func NewExport(src Image, opts ExportOptions) (*Export, error) { return nil, errors.New("TODO") }

// Size returns the size of the qcow2 file.
func (e *Export) Size() int64 { return 0 }

// AllocatedBytes returns how many bytes of the file hold something, for an
// honest st_blocks.
func (e *Export) AllocatedBytes() int64 { return 0 }

// ReadAt implements io.ReaderAt.
func (e *Export) ReadAt(p []byte, off int64) (int, error) { return 0, errors.New("TODO") }

// ExtentsAbove keeps the extents owned by layers above depth (Layer < depth):
// what a chain's top layers change over the chain that starts at layer depth.
func ExtentsAbove(ext []Extent, depth int) []Extent {
	var out []Extent
	for _, e := range ext {
		if e.Layer < depth {
			out = append(out, e)
		}
	}
	return out
}

// CreateOverlay writes an empty qcow2 v3 image of the given virtual size to
// dst, backed by backingName (may be empty for a standalone empty image).
func CreateOverlay(dst *os.File, size int64, clusterSize int64, backingName, backingFormat string) error {
	return errors.New("TODO")
}
