package qcow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Sentinel errors. Every error the package returns for bad input wraps one of
// these, with a message that says what exactly was wrong.
var (
	// ErrCorrupt: the image contradicts the qcow2 specification.
	ErrCorrupt = errors.New("qcow: corrupt image")
	// ErrUnsupported: a valid image uses a feature this package does not read.
	ErrUnsupported = errors.New("qcow: unsupported feature")
	// ErrEncrypted: the image is encrypted (AES or LUKS).
	ErrEncrypted = errors.New("qcow: encrypted image")
	// ErrLimit: a table or size is beyond QEMU's own limits.
	ErrLimit = errors.New("qcow: size beyond limits")
	// ErrBacking: a backing file could not be opened or is not allowed.
	ErrBacking = errors.New("qcow: backing file")
	// ErrChain: the backing chain is too deep or loops.
	ErrChain = errors.New("qcow: bad backing chain")
	// ErrDataFile: the image keeps its data in an external data file, which
	// is refused for untrusted images.
	ErrDataFile = errors.New("qcow: external data file")
	// ErrForeign: an untrusted image is in a format that is neither raw
	// nor qcow2 (VMDK, VHDX, ...), which would otherwise read as raw.
	ErrForeign = errors.New("qcow: not a raw or qcow2 image")
)

// Format is the on-disk format of one layer.
type Format int

// The formats a layer can have.
const (
	FormatRaw Format = iota
	FormatQcow2
)

// String returns the name qemu-img uses for the format.
func (f Format) String() string {
	switch f {
	case FormatRaw:
		return "raw"
	case FormatQcow2:
		return "qcow2"
	}
	return fmt.Sprintf("format(%d)", int(f))
}

// MarshalText makes formats print as their names in JSON.
func (f Format) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText reads a format name back.
func (f *Format) UnmarshalText(b []byte) (err error) {
	*f, err = ParseFormat(string(b))
	return err
}

// ParseFormat maps a qemu format name ("raw", "qcow2") to a Format.
func ParseFormat(name string) (Format, error) {
	switch name {
	case "raw":
		return FormatRaw, nil
	case "qcow2":
		return FormatQcow2, nil
	}
	return 0, fmt.Errorf("%w: format %q", ErrUnsupported, name)
}

// ExtentKind says how a range of an image reads.
type ExtentKind int

// The kinds of extent in an allocation map.
const (
	// Unallocated ranges are owned by no layer and read as zeros.
	Unallocated ExtentKind = iota
	// Zero ranges read as zeros because a layer says so (zero clusters).
	Zero
	// Data ranges are stored in a layer (possibly compressed).
	Data
)

// String returns "data", "zero" or "unallocated".
func (k ExtentKind) String() string {
	switch k {
	case Unallocated:
		return "unallocated"
	case Zero:
		return "zero"
	case Data:
		return "data"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// MarshalText makes extent kinds print as their names in JSON.
func (k ExtentKind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText reads an extent kind name back.
func (k *ExtentKind) UnmarshalText(b []byte) error {
	for _, kind := range []ExtentKind{Unallocated, Zero, Data} {
		if kind.String() == string(b) {
			*k = kind
			return nil
		}
	}
	return fmt.Errorf("qcow: unknown extent kind %q", b)
}

// Extent is one run of an allocation map.
type Extent struct {
	Offset int64      `json:"offset"`
	Length int64      `json:"length"`
	Kind   ExtentKind `json:"kind"`
	// Layer is the index in the chain of the layer that decides how the
	// range reads: 0 is the top image. Unallocated extents have Layer equal
	// to the chain's depth (no layer owns them).
	Layer int `json:"layer"`
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// Image is a readable block image with an allocation map.
type Image interface {
	io.ReaderAt
	io.Closer
	// Size returns the virtual size in bytes.
	Size() int64
	// Extents returns the allocation map of [off, off+length), clipped to
	// the image: adjacent extents of the same kind and layer are merged.
	// It reads metadata only, never data.
	Extents(off, length int64) ([]Extent, error)
}

// File is what an image is read from: a local file, an RBD snapshot, a
// buffer. Name identifies the file (it is used to resolve relative backing
// names and to detect loops in a chain).
type File interface {
	io.ReaderAt
	io.Closer
	// Size returns the size of the file in bytes.
	Size() int64
	// Name identifies the file, for messages and loop detection.
	Name() string
}

// BackingRef is a backing file reference, as found in an image header.
type BackingRef struct {
	// Name is the backing file name stored in the header.
	Name string
	// Format is the backing format from the header extension ("" if unset).
	Format string
	// From is the Name of the File that refers to it.
	From string
}

// Opener opens a backing file. It returns an error wrapping [ErrBacking]
// when the reference is not allowed or cannot be opened.
type Opener func(ref BackingRef) (File, error)

// osFile adapts an *os.File to File.
type osFile struct {
	*os.File
	size int64
	// key identifies the content of a file opened by OpenImmutableFile,
	// and is zero otherwise.
	key contentKey
}

func (f *osFile) Size() int64 { return f.size }

// contentKey identifies the bytes of an immutable local file: the inode
// and what changes with any write or replacement of it. Layers opened on
// files with the same key share their entries in a Cache.
type contentKey struct {
	dev, ino             uint64
	size                 int64
	mtimeNsec, ctimeNsec int64
}

// keyed is what files whose content has a contentKey implement.
type keyed interface{ contentKey() contentKey }

func (f *osFile) contentKey() contentKey { return f.key }

// OpenFile opens a local file read-only as a File.
func OpenFile(path string) (File, error) {
	f, _, err := openFile(path)
	if err != nil {
		return nil, err // not a nil *osFile in a non-nil File
	}
	return f, nil
}

// openFile is OpenFile, which also returns what fstat said of the file.
func openFile(path string) (*osFile, os.FileInfo, error) {
	// O_NONBLOCK: the open of a named pipe would wait for a writer,
	// forever and deaf to signals (snapfs volume import of a FIFO hung
	// through SIGTERM). Only files and block devices are images.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if kind := notAnImageFile(st.Mode()); kind != "" {
		f.Close()
		return nil, nil, fmt.Errorf("qcow: %s is %s, not a file or a block device", path, kind)
	}
	if err := syscall.SetNonblock(int(f.Fd()), false); err != nil {
		f.Close()
		return nil, nil, err
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		// Block devices report size 0 in Stat: ask the device.
		if end, err := f.Seek(0, io.SeekEnd); err == nil {
			size = end
		}
	}
	return &osFile{File: f, size: size}, st, nil
}

// notAnImageFile names the kind of file of mode if it cannot hold an
// image, and returns "" for a regular file or a block device.
func notAnImageFile(mode os.FileMode) string {
	if mode.IsRegular() || mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0 {
		return ""
	}
	return FileKind(mode)
}

// FileKind names the type of file of mode, for messages: "a directory",
// "a block device", "a character device", "a named pipe", "a socket", "a
// special file", or "a regular file".
func FileKind(mode os.FileMode) string {
	switch {
	case mode.IsRegular():
		return "a regular file"
	case mode.IsDir():
		return "a directory"
	case mode&os.ModeCharDevice != 0:
		return "a character device"
	case mode&os.ModeDevice != 0:
		return "a block device"
	case mode&os.ModeNamedPipe != 0:
		return "a named pipe"
	case mode&os.ModeSocket != 0:
		return "a socket"
	}
	return "a special file"
}

// OpenImmutableFile is OpenFile for a file that is never written while
// it exists under its inode, as the snapshot layers of a store: chains
// that open it again and again (every open of an export) then share what
// a Cache holds of it, and find its L2 tables already read and parsed.
// The key of the sharing includes the modification and change times, so
// a file that is rewritten after all is read afresh by later opens.
func OpenImmutableFile(path string) (File, error) {
	f, st, err := openFile(path)
	if err != nil {
		return nil, err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && st.Mode().IsRegular() {
		f.key = contentKey{
			dev: uint64(sys.Dev), ino: sys.Ino, size: sys.Size,
			mtimeNsec: sys.Mtim.Nano(), ctimeNsec: sys.Ctim.Nano(),
		}
	}
	return f, nil
}

// bytesFile is a File over a byte slice.
type bytesFile struct {
	name string
	data []byte
}

// BytesFile returns a File that reads from data.
func BytesFile(name string, data []byte) File { return &bytesFile{name: name, data: data} }

func (b *bytesFile) Name() string { return b.name }
func (b *bytesFile) Size() int64  { return int64(len(b.data)) }
func (b *bytesFile) Close() error { return nil }
func (b *bytesFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow: negative offset %d", off)
	}
	if off >= int64(len(b.data)) {
		return 0, io.EOF
	}
	n := copy(p, b.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
