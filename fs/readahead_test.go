package fs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/internal/qemutest"
)

// countingReader is an export for the read-ahead: it counts the reads that
// reach it and those in flight, can fail at one offset, and holds the
// reads at or after holdFrom until release is closed (both set before
// the first read).
type countingReader struct {
	data     []byte
	reads    atomic.Int64
	inFlight atomic.Int64
	failAt   int64 // reads that cover this offset fail; -1 for none
	holdFrom int64
	release  chan struct{}
}

var errInjected = errors.New("injected read error")

func (r *countingReader) ReadAt(p []byte, off int64) (int, error) {
	r.inFlight.Add(1)
	defer r.inFlight.Add(-1)
	if r.release != nil && off >= r.holdFrom {
		<-r.release
	}
	r.reads.Add(1)
	if r.failAt >= off && r.failAt < off+int64(len(p)) {
		return 0, errInjected
	}
	if off >= int64(len(r.data)) {
		return 0, io.EOF
	}
	n := copy(p, r.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8 && i+k < n; k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// fuseRead reads through ra as go-fuse does: the reply's bytes, then Done.
// dest is clipped to the file, as imageHandle.Read does.
func fuseRead(t *testing.T, ra *readahead, size int64, length int, off int64) []byte {
	t.Helper()
	dest := make([]byte, min(int64(length), size-off))
	res, err := ra.read(dest, off)
	if err != nil {
		t.Fatalf("read %d at %d: %v", length, off, err)
	}
	b, status := res.Bytes(make([]byte, len(dest)))
	if status != fuse.OK {
		t.Fatalf("read %d at %d: status %v", length, off, status)
	}
	got := bytes.Clone(b)
	res.Done()
	return got
}

// TestReadaheadExactBytes: sequential readers of every request size
// (aligned to the chunks or not, smaller and larger than them) and random
// readers get exactly the file's bytes, at its end too; sequential readers
// are served from chunks read ahead, and every chunk goes back to the pool
// once the file is closed.
func TestReadaheadExactBytes(t *testing.T) {
	const chunkSize = 64 << 10
	size := int64(40*chunkSize + 12345) // the last chunk is short
	src := &countingReader{data: randomBytes(int(size), 1), failAt: -1}
	for _, length := range []int{chunkSize, 16 << 10, chunkSize / 2, 100_000, 3 * chunkSize, 777} {
		t.Run(fmt.Sprintf("sequential %d", length), func(t *testing.T) {
			pool := &chunkPool{size: chunkSize, max: 8}
			ra := newReadahead(src, size, pool)
			for off := int64(0); off < size; off += int64(length) {
				if got := fuseRead(t, ra, size, length, off); !bytes.Equal(got, src.data[off:off+int64(len(got))]) || len(got) == 0 {
					t.Fatalf("read %d at %d: differs from the file", length, off)
				}
			}
			ra.close()
			if n := pool.used(); n != 0 {
				t.Fatalf("%d chunks still out of the pool after close", n)
			}
			if len(pool.free) == 0 {
				t.Fatal("no chunk was read ahead for a sequential reader")
			}
		})
	}
	t.Run("random", func(t *testing.T) {
		pool := &chunkPool{size: chunkSize, max: 8}
		ra := newReadahead(src, size, pool)
		rng := rand.New(rand.NewPCG(3, 4))
		for range 500 {
			off := rng.Int64N(size)
			length := 1 + rng.IntN(3*chunkSize)
			if got := fuseRead(t, ra, size, length, off); !bytes.Equal(got, src.data[off:off+int64(len(got))]) {
				t.Fatalf("read %d at %d: differs from the file", length, off)
			}
		}
		ra.close()
		if n := pool.used(); n != 0 {
			t.Fatalf("%d chunks still out of the pool after close", n)
		}
	})
	t.Run("random reader does not read ahead", func(t *testing.T) {
		pool := &chunkPool{size: chunkSize, max: 8}
		ra := newReadahead(src, size, pool)
		fuseRead(t, ra, size, 4096, 5*chunkSize) // not at 0: not sequential
		before := src.reads.Load()
		for _, off := range []int64{20 * chunkSize, 3 * chunkSize, 30*chunkSize + 7, chunkSize} {
			fuseRead(t, ra, size, 4096, off)
		}
		if n := src.reads.Load() - before; n != 4 {
			t.Fatalf("4 random reads made %d reads of the export; want 4, no read-ahead", n)
		}
		ra.close()
	})
}

// TestReadaheadBounded: readers that together want more chunks than the
// pool holds still read exact bytes (directly, when the pool is empty), and
// the pool never hands out more than its bound.
func TestReadaheadBounded(t *testing.T) {
	const chunkSize = 32 << 10
	size := int64(64 * chunkSize)
	src := &countingReader{data: randomBytes(int(size), 2), failAt: -1}
	pool := &chunkPool{size: chunkSize, max: 3}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for r := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ra := newReadahead(src, size, pool)
			defer ra.close()
			for off := int64(0); off < size; off += chunkSize / 2 {
				dest := make([]byte, chunkSize/2)
				res, err := ra.read(dest, off)
				if err != nil {
					errs <- err
					return
				}
				b, _ := res.Bytes(nil)
				ok := bytes.Equal(b, src.data[off:off+int64(len(b))]) && len(b) == len(dest)
				res.Done()
				if !ok {
					errs <- fmt.Errorf("reader %d: read at %d differs from the file", r, off)
					return
				}
				if n := pool.used(); n > pool.max {
					errs <- fmt.Errorf("%d chunks out of a pool of %d", n, pool.max)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := pool.used(); n != 0 {
		t.Fatalf("%d chunks still out of the pool after every file was closed", n)
	}
}

// TestReadaheadErrors: a chunk that fails to read is not served: the read
// that needs it reports the export's error, and the reads around it still
// get exact bytes.
func TestReadaheadErrors(t *testing.T) {
	const chunkSize = 64 << 10
	size := int64(16 * chunkSize)
	failAt := int64(5*chunkSize + 100)
	src := &countingReader{data: randomBytes(int(size), 3), failAt: failAt}
	pool := &chunkPool{size: chunkSize, max: 8}
	ra := newReadahead(src, size, pool)
	defer ra.close()
	const length = 16 << 10
	failed := 0
	for off := int64(0); off < size; off += length {
		dest := make([]byte, length)
		res, err := ra.read(dest, off)
		if off <= failAt && failAt < off+length {
			if !errors.Is(err, errInjected) {
				t.Fatalf("read at %d, over the failing offset: %v, want the export's error", off, err)
			}
			failed++
			continue
		}
		if err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		b, _ := res.Bytes(nil)
		if !bytes.Equal(b, src.data[off:off+length]) {
			t.Fatalf("read at %d differs from the file", off)
		}
		res.Done()
	}
	if failed != 1 {
		t.Fatalf("%d reads failed, want 1", failed)
	}
}

// TestReadaheadCloseCancels: closing a file stops its read-ahead: close
// waits for the chunks being read (the export is closed next), no chunk is
// started after it, the chunks go back to the pool, and a reply still
// being written keeps its chunk until it is done with.
func TestReadaheadCloseCancels(t *testing.T) {
	const chunkSize = 64 << 10
	size := int64(64 * chunkSize)
	// The first two chunks read at once; those after are held.
	src := &countingReader{data: randomBytes(int(size), 4), failAt: -1, holdFrom: 2 * chunkSize, release: make(chan struct{})}
	pool := &chunkPool{size: chunkSize, max: 16}
	ra := newReadahead(src, size, pool)
	// Two sequential reads: the window grows past its first chunks, whose
	// reads are held.
	first := fuseRead(t, ra, size, chunkSize, 0)
	second := make([]byte, chunkSize)
	res, err := ra.read(second, chunkSize)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, src.data[:chunkSize]) {
		t.Fatal("first read differs from the file")
	}
	if pool.used() < 3 {
		t.Fatalf("%d chunks out of the pool, want the pending reply's and more read ahead", pool.used())
	}
	inFlightAtClose := make(chan int64)
	go func() {
		ra.close()
		inFlightAtClose <- src.inFlight.Load()
	}()
	time.Sleep(10 * time.Millisecond) // let close reach its wait
	close(src.release)
	if n := <-inFlightAtClose; n != 0 {
		t.Fatalf("close returned with %d reads of the export in flight", n)
	}
	reads := src.reads.Load()
	// The reply not yet written still holds its chunk, with the right
	// bytes in it.
	if n := pool.used(); n != 1 {
		t.Fatalf("%d chunks out of the pool after close with one reply pending, want 1", n)
	}
	b, _ := res.Bytes(nil)
	if !bytes.Equal(b, src.data[chunkSize:2*chunkSize]) {
		t.Fatal("the pending reply differs from the file")
	}
	res.Done()
	if n := pool.used(); n != 0 {
		t.Fatalf("%d chunks out of the pool after the last reply", n)
	}
	// Reads after close (go-fuse may still deliver some) are answered
	// directly, without read-ahead.
	fuseRead(t, ra, size, chunkSize, 2*chunkSize)
	if n := src.reads.Load() - reads; n != 1 {
		t.Fatalf("a read after close made %d reads of the export, want 1", n)
	}
	if n := pool.used(); n != 0 {
		t.Fatalf("a read after close took %d chunks", n)
	}
}

// TestReadaheadMount reads the exports of a chain through a real mount,
// sequentially with the request sizes of cat, dd and odd-sized readers,
// and at random, against qemu-img's flattening of the chain. It also reads
// a snapshot while the snapshot below it is deleted (its data merges into
// the layer the reader reads through): the reader keeps reading the bytes
// it started with.
func TestReadaheadMount(t *testing.T) {
	const size = 24 << 20
	store := newStore(t)
	newVolume(t, store, "v", size, "write -P 0x11 0 24M")
	m := testMount(t, store)
	snaps := m.path("volumes", "v", "snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "v", "write -P 0x22 1M 5M", "write -z 8M 2M", "discard 12M 1M", "write -P 0x33 20M 64k")
	if err := os.Mkdir(filepath.Join(snaps, "s2"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, "v", "write -P 0x44 3M 7M", "write -P 0x55 23M 1M")
	if err := os.Mkdir(filepath.Join(snaps, "s3"), 0o755); err != nil {
		t.Fatal(err)
	}
	ref := qemutest.ConvertRaw(t, snapshotPath(t, store, "v", "s3"))
	disk := filepath.Join(snaps, "s3", "disk.raw")

	for _, length := range []int{1 << 20, 128 << 10, 4 << 20, 300_001, 4096} {
		f, err := os.Open(disk)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 0, size)
		buf := make([]byte, length)
		for {
			n, err := f.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
		if !bytes.Equal(got, ref) {
			t.Fatalf("sequential reads of %d bytes differ from qemu-img at byte %d", length, firstDiff(got, ref))
		}
	}

	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for range 300 {
		off := rng.Int64N(size)
		buf := make([]byte, 1+rng.IntN(3<<20))
		n, err := f.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], ref[off:off+int64(n)]) || (n < len(buf) && off+int64(n) != size) {
			t.Fatalf("read of %d bytes at %d differs from qemu-img", len(buf), off)
		}
	}
	f.Close()

	// Half of s3 read, s2 (below it) deleted, the rest read.
	f, err = os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, size)
	if _, err := io.ReadFull(f, got[:size/2]); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(snaps, "s2")); err != nil {
		t.Fatalf("rmdir s2: %v", err)
	}
	if err := os.Remove(filepath.Join(snaps, "s3")); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("rmdir s3 while it is read: %v, want EBUSY", err)
	}
	if _, err := io.ReadFull(f, got[size/2:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		t.Fatalf("s3 read while s2 was deleted differs from qemu-img at byte %d", firstDiff(got, ref))
	}
	f.Close()
	checkExports(t, m, "v", "s3")
}

// TestMapBufferAligned checks the chunk buffers: a buffer in whole huge
// pages starts on a huge page, so that the kernel can back it with huge
// pages; others are plain mappings. Each is exactly its size and writable
// end to end.
func TestMapBufferAligned(t *testing.T) {
	for _, size := range []int{hugePage, 2 * hugePage, raChunkSize, 64 << 10} {
		b, err := mapBuffer(size)
		if err != nil {
			t.Fatalf("mapBuffer(%d): %v", size, err)
		}
		if len(b) != size || cap(b) != size {
			t.Errorf("mapBuffer(%d): len %d, cap %d", size, len(b), cap(b))
		}
		if addr := uintptr(unsafe.Pointer(&b[0])); size%hugePage == 0 && addr%hugePage != 0 {
			t.Errorf("mapBuffer(%d) at %#x: not aligned to %d", size, addr, hugePage)
		}
		b[0], b[size-1] = 1, 2
		if b[0] != 1 || b[size-1] != 2 {
			t.Errorf("mapBuffer(%d): not writable", size)
		}
	}
}
