package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"snapfs/internal/units"
	"snapfs/qcow"
)

// ImportError is why an image was refused for import. Its message says
// what was wrong and what to do; it wraps ErrInvalid (EINVAL at the mount)
// and the qcow sentinel that refused the image (qcow.ErrBacking,
// qcow.ErrCorrupt, ...), for errors.Is.
type ImportError struct {
	Msg string
	Err error
}

// Error returns the message for the user.
func (e *ImportError) Error() string { return e.Msg }

// Unwrap returns ErrInvalid and the cause.
func (e *ImportError) Unwrap() []error { return []error{ErrInvalid, e.Err} }

// flattenHint is how to turn any image qemu reads into one snapfs takes.
const flattenHint = "qemu-img convert -O qcow2 IN OUT"

// OpenUntrusted opens the image file at path for import, as untrusted
// input: the format is probed from the content (qcow2 or raw, never from
// the name); a qcow2 with a backing file, an external data file,
// encryption, unknown features or impossible tables is refused; and the
// virtual size must be between 1 byte and MaxVolumeSize. Refusals are
// *ImportError. The caller closes the image.
//
// The image knows its path: a backend that keeps a qcow2 as it is (the
// local store) copies the file rather than the image, and checks the copy
// again (see LocalStore.copyFile).
func OpenUntrusted(path string) (qcow.Image, error) {
	f, err := qcow.OpenFile(path)
	if err != nil {
		return nil, err
	}
	img, err := OpenUntrustedFile(f)
	if err != nil {
		return nil, err
	}
	return &fileImage{Image: img, path: path, file: f}, nil
}

// openUntrusted is OpenUntrusted without the path.
func openUntrusted(path string) (qcow.Image, error) {
	f, err := qcow.OpenFile(path)
	if err != nil {
		return nil, err
	}
	return OpenUntrustedFile(f)
}

// fileImage is an image OpenUntrusted opened from file, at path, which
// stays the caller's. The image owns file: a copy of the image's file is
// made from it, not from the path, which may name another file by then.
type fileImage struct {
	qcow.Image
	path string
	file qcow.File
}

// OpenUntrustedFile is OpenUntrusted over an open file, which the image
// owns (it is closed on error too).
func OpenUntrustedFile(f qcow.File) (qcow.Image, error) {
	var backing *qcow.BackingRef
	c, err := qcow.Open(f, qcow.Options{
		Untrusted: true,
		// Refuse every backing file, as a nil opener would, but learn
		// its name for the message.
		Open: func(ref qcow.BackingRef) (qcow.File, error) {
			backing = &ref
			return nil, fmt.Errorf("%w: %q: an imported image may not have one", qcow.ErrBacking, ref.Name)
		},
	})
	if err != nil {
		if backing != nil {
			return nil, &ImportError{
				Msg: fmt.Sprintf("import: image has a backing file (%q); flatten it first (%s)", backing.Name, flattenHint),
				Err: err,
			}
		}
		return nil, importRefusal(err)
	}
	if err := checkImportSize(c.Size()); err != nil {
		c.Close()
		return nil, err
	}
	// qemu reads past the end of a file as zeros, so a truncated qcow2
	// opens; Verify refuses tables and clusters that are not in the file.
	if err := c.Verify(context.Background()); err != nil {
		c.Close()
		return nil, importRefusal(err)
	}
	return c, nil
}

// PauseImportAdopting is the pause point (see PauseEnv) where a staged
// image (StagedImage) has been checked and is about to be moved into the
// store.
const PauseImportAdopting = "import-adopting"

// StagedImage is an image opened from a file that the caller gives up
// once the image is imported or restored: a staged copy, such as the
// mount writes for import/. A backend that can take the file over as it
// is, rather than copy the image, does (the local store: see adoptFile);
// any other reads it as the Image it is. Either way, the caller closes
// the image and then removes what is left at the path, if anything is.
type StagedImage struct {
	qcow.Image
	path string
}

// OpenStaged is OpenUntrusted for a staged file (see StagedImage): the same
// checks, the same refusals.
func OpenStaged(path string) (*StagedImage, error) {
	img, err := openUntrusted(path)
	if err != nil {
		return nil, err
	}
	return &StagedImage{Image: img, path: path}, nil
}

// adoptable says why img, an untrusted image opened and checked by
// OpenUntrustedFile, cannot be a layer of the store as it is, or returns
// nil if it can: a lone qcow2 (no backing file, no data file: refused on
// open already) that qemu opens read-only without repairing anything
// (neither dirty nor marked corrupt), without internal snapshots (data
// nobody could reach), whose virtual size is size, in whole sectors as
// the store's sizes are. Any cluster size, compression or refcount width
// will do: the store reads layers with the same engine that checked it.
func adoptable(img qcow.Image, size int64) error {
	c, ok := img.(*qcow.Chain)
	if !ok || c.Depth() != 1 {
		return errors.New("not a lone image")
	}
	info, err := c.Info()
	if err != nil {
		return err
	}
	l := info.Layers[0]
	switch {
	case l.Format != qcow.FormatQcow2:
		return fmt.Errorf("%s, not qcow2", l.Format)
	case l.VirtualSize != size || size%sectorSize != 0:
		return fmt.Errorf("virtual size %d, want %d", l.VirtualSize, size)
	case len(l.Snapshots) > 0:
		return errors.New(units.Count(len(l.Snapshots), "internal snapshot"))
	}
	for _, f := range l.Features {
		switch f {
		case "dirty", "corrupt", "external_data_file", "raw_external_data":
			return fmt.Errorf("feature %s", f)
		}
	}
	return nil
}

func checkImportSize(size int64) error {
	switch {
	case size <= 0:
		return &ImportError{Msg: "import: the image is empty (virtual size 0)", Err: qcow.ErrLimit}
	case size > MaxVolumeSize:
		return &ImportError{
			Msg: fmt.Sprintf("import: virtual size %d bytes is beyond the limit of %d TiB", size, MaxVolumeSize>>40),
			Err: qcow.ErrLimit,
		}
	}
	return nil
}

// importRefusal turns a qcow refusal of an untrusted image (at open, or
// while it is copied) into an *ImportError with advice; other errors (I/O,
// cancellation) pass unchanged.
func importRefusal(err error) error {
	var ie *ImportError
	if errors.As(err, &ie) {
		return err
	}
	var msg string
	switch {
	case errors.Is(err, qcow.ErrBacking):
		msg = fmt.Sprintf("import: image has a backing file (%v); flatten it first (%s)", err, flattenHint)
	case errors.Is(err, qcow.ErrDataFile):
		msg = fmt.Sprintf("import: image keeps its data in an external data file (%v); flatten it first (%s)", err, flattenHint)
	case errors.Is(err, qcow.ErrEncrypted):
		msg = fmt.Sprintf("import: image is encrypted (%v)", err)
		if !strings.Contains(err.Error(), "decrypt") {
			msg += "; decrypt it first (qemu-img convert with --object secret and -O qcow2)"
		}
	case errors.Is(err, qcow.ErrForeign):
		msg = fmt.Sprintf("import: only raw and qcow2 images are taken (%v); convert it first (%s)", err, flattenHint)
	case errors.Is(err, qcow.ErrCorrupt):
		msg = fmt.Sprintf("import: image is damaged or truncated (%v); qemu-img check shows what, and qemu-img check -r all repairs what it can, on a copy", err)
	case errors.Is(err, qcow.ErrLimit), errors.Is(err, qcow.ErrChain):
		msg = fmt.Sprintf("import: image refused (%v)", err)
	case errors.Is(err, qcow.ErrUnsupported):
		msg = fmt.Sprintf("import: image uses a feature snapfs does not read (%v); rewrite it first (%s)", err, flattenHint)
	default:
		return err
	}
	return &ImportError{Msg: msg, Err: err}
}

// sectorSize is the unit of qemu's virtual sizes: qemu rounds a raw file's
// size up to it, and qcow2 sizes are whole sectors.
const sectorSize = 512

func roundToSector(n int64) int64 { return (n + sectorSize - 1) &^ (sectorSize - 1) }

// paddedImage reads as img, then zeros up to size (whole sectors), as
// qemu reads a raw file whose size is not a multiple of 512.
type paddedImage struct {
	qcow.Image
	size int64
}

// padToSector returns img, or img padded to whole sectors.
func padToSector(img qcow.Image) qcow.Image {
	if size := roundToSector(img.Size()); size != img.Size() {
		return paddedImage{Image: img, size: size}
	}
	return img
}

func (p paddedImage) Size() int64 { return p.size }

func (p paddedImage) ReadAt(b []byte, off int64) (int, error) {
	if off >= p.size {
		return 0, io.EOF
	}
	inner := p.Image.Size()
	n := int(min(int64(len(b)), p.size-off))
	if off < inner {
		m := int(min(int64(n), inner-off))
		if k, err := p.Image.ReadAt(b[:m], off); k < m {
			return k, err
		}
		clear(b[m:n])
	} else {
		clear(b[:n])
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func (p paddedImage) Extents(off, length int64) ([]qcow.Extent, error) {
	length = min(length, p.size-off)
	inner := p.Image.Size()
	var out []qcow.Extent
	if off < inner {
		ext, err := p.Image.Extents(off, min(length, inner-off))
		if err != nil {
			return nil, err
		}
		out = ext
	}
	if end := off + length; end > inner {
		start := max(off, inner)
		out = append(out, qcow.Extent{Offset: start, Length: end - start, Kind: qcow.Zero})
	}
	return out, nil
}
