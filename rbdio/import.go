//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// zeroBlock is the granularity at which an import finds zeros to skip:
// the page size, so that a guest filesystem's free blocks become holes.
const zeroBlock = 4096

var zeros = make([]byte, zeroBlock)

// ImportVolume implements [snapshot.Backend]. The image is written to a
// new image under a temporary name (".snapfs-import-RANDOM", which
// ListVolumes never shows), with up to maxInFlight object-sized writes in
// flight; ranges the source does not allocate, and 4 KiB blocks of zeros,
// are not written, so the new image is thin. The image is then renamed to
// name (atomic in RBD): the volume appears complete or not at all. On an
// error the temporary image is removed; after a crash, the next Open
// removes it (see Pool.sweep). The context's progress function
// (snapshot.WithProgress) sees the bytes copied. A full cluster or pool
// makes it time out, and the error says so.
func (p *Pool) ImportVolume(ctx context.Context, name string, src qcow.Image, meta map[string]string) (_ snapshot.Volume, err error) {
	defer func() { err = p.cluster.explainTimeout(err) }()
	if err := snapshot.CheckVolumeName(name); err != nil {
		return snapshot.Volume{}, err
	}
	if err := checkSize(src.Size()); err != nil {
		return snapshot.Volume{}, err
	}
	if err := checkMetadata(meta); err != nil {
		return snapshot.Volume{}, err
	}
	release, err := p.lockVolumes(ctx, name)
	if err != nil {
		return snapshot.Volume{}, err
	}
	defer release()
	if img, err := p.openImage(name, "", false); err == nil {
		img.Close()
		return snapshot.Volume{}, fmt.Errorf("%w: volume %q", snapshot.ErrExists, name)
	} else if !errors.Is(err, snapshot.ErrNotFound) {
		return snapshot.Volume{}, err
	}

	io, err := p.io()
	if err != nil {
		return snapshot.Volume{}, err
	}
	tmp := tempName(tempPrefix)
	p.importing.Store(tmp, struct{}{})
	defer p.importing.Delete(tmp)
	if err := p.create(tmp, roundToSector(src.Size())); err != nil {
		return snapshot.Volume{}, err
	}
	img, err := p.openImage(tmp, "", true)
	if err != nil {
		rbd.RemoveImage(io, tmp)
		return snapshot.Volume{}, err
	}
	open := true
	defer func() {
		if open {
			img.Close()
		}
		if err != nil {
			rbd.RemoveImage(io, tmp)
		}
	}()
	id, err := img.GetId()
	if err != nil {
		return snapshot.Volume{}, wrap("info "+p.spec(tmp), err)
	}
	st, err := img.Stat()
	if err != nil {
		return snapshot.Volume{}, wrap("info "+p.spec(tmp), err)
	}
	if err := writeImage(ctx, img, p.spec(tmp), src, int64(st.Obj_size)); err != nil {
		return snapshot.Volume{}, err
	}
	if len(meta) > 0 {
		if err := setMeta(img, metaVolumeKey, volumeMeta{Image: id, Metadata: copyMetadata(meta)}); err != nil {
			return snapshot.Volume{}, err
		}
	}
	if err := img.Flush(); err != nil {
		return snapshot.Volume{}, wrap("flush "+p.spec(tmp), err)
	}
	open = false
	if err := img.Close(); err != nil {
		return snapshot.Volume{}, wrap("close "+p.spec(tmp), err)
	}
	if err := ctx.Err(); err != nil {
		return snapshot.Volume{}, err
	}
	err = rbd.GetImage(io, tmp).Rename(name)
	if errnoOf(err) == syscall.EEXIST {
		return snapshot.Volume{}, fmt.Errorf("%w: volume %q", snapshot.ErrExists, name)
	}
	if err != nil {
		return snapshot.Volume{}, wrap("rename "+p.spec(tmp)+" "+name, err)
	}
	return p.Volume(ctx, name)
}

// writeImage copies what src allocates into img (new, all holes), up to
// maxInFlight pieces at once, skipping blocks of zeros.
func writeImage(ctx context.Context, img *rbd.Image, what string, src qcow.Image, objectSize int64) error {
	ext, err := src.Extents(0, src.Size())
	if err != nil {
		return err
	}
	var data []span
	var total int64
	for _, e := range ext {
		if e.Kind == qcow.Data {
			data = append(data, span{e.Offset, e.End()})
			total += e.Length
		}
	}
	step := min(objectSize, maxPiece)
	if step <= 0 {
		step = maxPiece
	}
	report := snapshot.ProgressFrom(ctx)
	if report != nil {
		report(0, total)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pieces := make(chan span)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // protects first
		first error
		done  atomic.Int64
	)
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
		}
		mu.Unlock()
		cancel()
	}
	for range maxInFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, step)
			for s := range pieces {
				if ctx.Err() != nil {
					continue // drain
				}
				b := buf[:s.end-s.off]
				if err := readFull(src, b, s.off); err != nil {
					fail(err)
					continue
				}
				if err := writeNonZero(img, what, b, s.off); err != nil {
					fail(err)
					continue
				}
				n := done.Add(s.end - s.off)
				if report != nil {
					report(n, total)
				}
			}
		}()
	}
feed:
	for _, d := range data {
		for off := d.off; off < d.end; {
			end := min(d.end, (off/step+1)*step)
			select {
			case pieces <- span{off, end}:
			case <-ctx.Done():
				break feed
			}
			off = end
		}
	}
	close(pieces)
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}

// readFull reads len(b) bytes of src at off; the source is inside its
// size, so a short read is an error.
func readFull(src qcow.Image, b []byte, off int64) error {
	n, err := src.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil {
		err = fmt.Errorf("short read: %d of %d bytes at %d", n, len(b), off)
	}
	return fmt.Errorf("import: reading the image: %w", err)
}

// writeNonZero writes the runs of b that are not whole zero blocks.
func writeNonZero(img *rbd.Image, what string, b []byte, off int64) error {
	for i := 0; i < len(b); {
		// Skip zero blocks (blocks are aligned to the start of b, which
		// is object-aligned or the start of an extent).
		for i < len(b) && isZeroBlock(b[i:min(i+zeroBlock, len(b))]) {
			i = min(i+zeroBlock, len(b))
		}
		j := i
		for j < len(b) && !isZeroBlock(b[j:min(j+zeroBlock, len(b))]) {
			j = min(j+zeroBlock, len(b))
		}
		if j > i {
			if _, err := img.WriteAt(b[i:j], off+int64(i)); err != nil {
				return wrap(fmt.Sprintf("write %s at %d", what, off+int64(i)), err)
			}
		}
		i = j
	}
	return nil
}

func isZeroBlock(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }
