package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// DefaultMaxDepth caps backing chains when Options.MaxDepth is 0.
const DefaultMaxDepth = 256

// Options say how to open an image.
type Options struct {
	// Open opens backing files. When nil, an image with a backing file is
	// refused with ErrBacking.
	Open Opener
	// OpenDataFile opens external data files. When nil, or when Untrusted
	// is set, images with an external data file are refused with
	// ErrDataFile.
	OpenDataFile Opener
	// Untrusted marks input from users: external data files are refused
	// whatever OpenDataFile says, and a top image probed as raw that
	// bears the signature of another format (VMDK, VHDX, LUKS, ...) is
	// refused with ErrForeign (ErrEncrypted for LUKS).
	Untrusted bool
	// Format forces the format of the top image instead of probing it.
	Format *Format
	// MaxDepth caps the chain length (DefaultMaxDepth when 0).
	MaxDepth int
	// Cache holds metadata and decompressed clusters; a private cache of
	// DefaultCacheBytes is made when nil.
	Cache *Cache
	// Decompress inflates compressed clusters (DefaultDecompressor when nil).
	Decompress Decompressor
}

// Chain is an image and its backing layers, read as one flattened image.
// It is safe for concurrent use.
type Chain struct {
	layers []layer // 0 is the top image
	// sizes[i] is the virtual size of layer i, which reads as zeros past it.
	sizes []int64
}

// Probe tells the format of an image from its content, never its name: a
// qcow2 magic number means qcow2, anything else is raw.
func Probe(r io.ReaderAt) (Format, error) {
	var m [4]byte
	n, err := r.ReadAt(m[:], 0)
	if n < 4 {
		if err == nil || errors.Is(err, io.EOF) {
			return FormatRaw, nil
		}
		return 0, err
	}
	if binary.BigEndian.Uint32(m[:]) == magic {
		return FormatQcow2, nil
	}
	return FormatRaw, nil
}

// Open opens f and its whole backing chain. The chain owns f and every
// backing file, and Close closes them all; on error they are closed already.
func Open(f File, opts Options) (c *Chain, err error) {
	if opts.Cache == nil {
		opts.Cache = NewCache(DefaultCacheBytes)
	}
	if opts.Decompress == nil {
		opts.Decompress = DefaultDecompressor
	}
	maxDepth := opts.MaxDepth
	if maxDepth <= 0 {
		maxDepth = DefaultMaxDepth
	}
	// chain, not the named result c: "return nil, err" sets c to nil
	// before this deferred cleanup runs.
	chain := &Chain{}
	c = chain
	cur := f // the file being opened, not yet owned by a layer
	defer func() {
		if err != nil {
			if cur != nil {
				cur.Close()
			}
			chain.closeLayers()
			c = nil
		}
	}()
	seen := map[string]bool{}
	format := opts.Format
	for {
		if seen[cur.Name()] {
			return nil, fmt.Errorf("%w: %q appears twice in the chain (a loop)", ErrChain, cur.Name())
		}
		seen[cur.Name()] = true
		l, ref, err := openLayer(cur, format, opts)
		if err != nil {
			if cur != f {
				err = fmt.Errorf("backing file %q: %w", cur.Name(), err)
			}
			return nil, err
		}
		c.layers = append(c.layers, l)
		c.sizes = append(c.sizes, l.size())
		name := cur.Name()
		cur = nil
		if ref == nil {
			return c, nil
		}
		if len(c.layers) >= maxDepth {
			return nil, fmt.Errorf("%w: more than %d layers", ErrChain, maxDepth)
		}
		if opts.Open == nil {
			return nil, fmt.Errorf("%w: %q has a backing file (%q) and none may be opened here", ErrBacking, name, ref.Name)
		}
		format = nil
		if ref.Format != "" {
			fm, err := ParseFormat(ref.Format)
			if err != nil {
				return nil, fmt.Errorf("backing file %q of %q: %w", ref.Name, name, err)
			}
			format = &fm
		}
		next, err := opts.Open(*ref)
		if err != nil {
			if !errors.Is(err, ErrBacking) {
				err = fmt.Errorf("%w %q of %q: %w", ErrBacking, ref.Name, name, err)
			}
			return nil, err
		}
		cur = next
	}
}

// openLayer opens one layer and returns its backing reference, if any.
func openLayer(f File, format *Format, opts Options) (layer, *BackingRef, error) {
	fm := FormatRaw
	if format != nil {
		fm = *format
	} else {
		var err error
		if fm, err = Probe(f); err != nil {
			return nil, nil, fmt.Errorf("qcow: probing %q: %w", f.Name(), err)
		}
	}
	if fm == FormatRaw {
		if opts.Untrusted && format == nil {
			if err := checkNotForeign(f); err != nil {
				return nil, nil, err
			}
		}
		return &rawLayer{f: f}, nil, nil
	}
	l, err := openQcow2(f, opts.Cache, opts.Decompress)
	if err != nil {
		return nil, nil, err
	}
	if l.h.dataFile != "" || l.h.incompatible&incompatDataFile != 0 {
		if opts.Untrusted || opts.OpenDataFile == nil {
			return nil, nil, fmt.Errorf("%w: %q keeps its data in %q; refused for an untrusted image", ErrDataFile, f.Name(), l.h.dataFile)
		}
		df, err := opts.OpenDataFile(BackingRef{Name: l.h.dataFile, From: f.Name()})
		if err != nil {
			return nil, nil, fmt.Errorf("%w %q: %w", ErrDataFile, l.h.dataFile, err)
		}
		l.data = df
	}
	if l.h.backingName == "" {
		return l, nil, nil
	}
	return l, &BackingRef{Name: l.h.backingName, Format: l.h.backingFormat, From: f.Name()}, nil
}

func (c *Chain) closeLayers() error {
	var errs []error
	for _, l := range c.layers {
		if ql, ok := l.(*qcowLayer); ok && ql.data != ql.f {
			if cl, ok := ql.data.(io.Closer); ok {
				errs = append(errs, cl.Close())
			}
		}
		errs = append(errs, l.close())
	}
	c.layers = nil
	return errors.Join(errs...)
}

// Close closes every file of the chain.
func (c *Chain) Close() error { return c.closeLayers() }

// Size implements [Image].
func (c *Chain) Size() int64 { return c.sizes[0] }

// Depth returns the number of layers.
func (c *Chain) Depth() int { return len(c.layers) }

// ReadAt implements [io.ReaderAt] over the flattened chain.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow: negative offset %d", off)
	}
	size := c.Size()
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	if err := c.readLayer(0, p[:n], off); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readLayer fills p from layer i down, falling through unallocated runs.
func (c *Chain) readLayer(i int, p []byte, off int64) error {
	for len(p) > 0 {
		if i == len(c.layers) || off >= c.sizes[i] {
			clear(p)
			return nil
		}
		l := c.layers[i]
		r, err := l.lookup(off, min(int64(len(p)), c.sizes[i]-off))
		if err != nil {
			return err
		}
		seg := p[:r.length]
		switch r.kind {
		case unitUnallocated:
			err = c.readLayer(i+1, seg, off)
		case unitZero:
			clear(seg)
		default:
			err = l.read(seg, r, off)
		}
		if err != nil {
			return err
		}
		p, off = p[r.length:], off+r.length
	}
	return nil
}

// Extents implements [Image].
func (c *Chain) Extents(off, length int64) ([]Extent, error) {
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("qcow: negative range %d+%d", off, length)
	}
	length = min(length, c.Size()-off)
	var out []Extent
	if length <= 0 {
		return nil, nil
	}
	err := c.mapLayer(0, off, length, func(e Extent) {
		if n := len(out); n > 0 && out[n-1].Kind == e.Kind && out[n-1].Layer == e.Layer && out[n-1].End() == e.Offset {
			out[n-1].Length += e.Length
			return
		}
		out = append(out, e)
	})
	return out, err
}

// mapLayer emits the extents of [off, off+length) from layer i down.
func (c *Chain) mapLayer(i int, off, length int64, emit func(Extent)) error {
	for length > 0 {
		if i == len(c.layers) || off >= c.sizes[i] {
			emit(Extent{Offset: off, Length: length, Kind: Unallocated, Layer: len(c.layers)})
			return nil
		}
		r, err := c.layers[i].lookup(off, min(length, c.sizes[i]-off))
		if err != nil {
			return err
		}
		if r.kind == unitUnallocated {
			if err := c.mapLayer(i+1, off, r.length, emit); err != nil {
				return err
			}
		} else {
			emit(Extent{Offset: off, Length: r.length, Kind: r.kind.extentKind(), Layer: i})
		}
		off, length = off+r.length, length-r.length
	}
	return nil
}
