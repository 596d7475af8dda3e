package qcow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Decompressor inflates one compressed cluster. src holds the bytes stored
// for the cluster, possibly followed by padding up to a sector boundary; dst
// is one cluster and must be filled entirely, or an error returned.
type Decompressor func(c Compression, dst, src []byte) error

// Compressor deflates one cluster into dst's spare capacity and returns the
// compressed bytes. It returns ok=false when the data does not get smaller
// than limit bytes, and the cluster is then stored uncompressed.
type Compressor func(c Compression, dst, src []byte, limit int) (out []byte, ok bool, err error)

// qemuDeflateWindow is the window QEMU uses for zlib clusters (windowBits
// -12): data compressed with a larger window does not inflate in QEMU.
const qemuDeflateWindow = 4096

// maxZstdWindow bounds the window a zstd cluster may declare. The decoder
// allocates the declared window before it decodes a byte, so without a bound
// a 25-byte hostile cluster costs 512 MiB. QEMU compresses one cluster (at
// most 2 MiB) with its size known, so its frames never declare more than
// that; the bound leaves room for other encoders.
const maxZstdWindow = 8 << 20

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(maxZstdWindow))
	if err != nil {
		panic("BUG: zstd decoder options: " + err.Error())
	}
	return d
}}

var zstdEncoders = sync.Pool{New: func() any {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		panic("BUG: zstd encoder options: " + err.Error())
	}
	return e
}}

// DefaultDecompressor inflates raw deflate (zlib type) and zstd clusters as
// QEMU writes them. Trailing padding after the compressed stream is ignored.
func DefaultDecompressor(c Compression, dst, src []byte) error {
	var r io.Reader
	switch c {
	case CompressionZlib:
		fr := flate.NewReader(bytes.NewReader(src))
		defer fr.Close()
		r = fr
	case CompressionZstd:
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return fmt.Errorf("%w: zstd cluster: %v", ErrCorrupt, err)
		}
		r = d
	default:
		return fmt.Errorf("%w: compression type %d", ErrUnsupported, c)
	}
	if _, err := io.ReadFull(r, dst); err != nil {
		return fmt.Errorf("%w: %s cluster does not inflate to %d bytes: %v", ErrCorrupt, c, len(dst), err)
	}
	return nil
}

// DefaultCompressor compresses as QEMU does: raw deflate with a 4 KiB window
// for zlib, a single frame for zstd.
func DefaultCompressor(c Compression, dst, src []byte, limit int) ([]byte, bool, error) {
	switch c {
	case CompressionZlib:
		buf := bytes.NewBuffer(dst[:0])
		w, err := flate.NewWriterWindow(buf, qemuDeflateWindow)
		if err != nil {
			return nil, false, err
		}
		if _, err := w.Write(src); err != nil {
			return nil, false, err
		}
		if err := w.Close(); err != nil {
			return nil, false, err
		}
		out := buf.Bytes()
		return out, len(out) < limit, nil
	case CompressionZstd:
		e := zstdEncoders.Get().(*zstd.Encoder)
		defer zstdEncoders.Put(e)
		out := e.EncodeAll(src, dst[:0])
		return out, len(out) < limit, nil
	}
	return nil, false, fmt.Errorf("%w: compression type %d", ErrUnsupported, c)
}

// CheckCompressed inflates every compressed cluster of the top layer and
// returns the error of the first that does not inflate to a whole cluster
// (wrapping ErrCorrupt). Verify checks metadata only, and a compressed
// cluster that holds garbage reads as an error in QEMU (EIO) as here: a
// store that keeps an image file as it is, rather than read all of it to
// convert it, calls this too. It reads nothing but the compressed
// clusters and the L2 tables.
func (c *Chain) CheckCompressed(ctx context.Context) error {
	l, ok := c.layers[0].(*qcowLayer)
	if !ok {
		return nil // raw: nothing compressed
	}
	size := c.sizes[0]
	for off, seen := int64(0), 0; off < size; seen++ {
		if seen%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		r, err := l.lookup(off, size-off)
		if err != nil {
			return err
		}
		if r.kind == unitCompressed {
			if _, err := l.compressedCluster(r); err != nil {
				return err
			}
		}
		off += r.length
	}
	return nil
}
