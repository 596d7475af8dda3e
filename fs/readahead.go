package fs

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// Read-ahead for the exports of snapshots.
//
// Exports are served with direct I/O (see exportFile.Open), so the kernel
// neither caches nor reads ahead: each read(2) of a reader becomes one
// request of at most 1 MiB, answered before the next one is sent. A chain
// read one request at a time keeps one pread in flight on the layer files,
// which leaves the disk idle most of the time (cold reads are I/O bound).
// A sequential reader therefore gets its next chunks read in parallel
// before it asks for them, as qemu-img convert keeps several requests in
// flight, and its reads are answered from those chunks without a copy.
//
// Memory stays bounded whatever the export size and the number of open
// files: chunks come from one pool of at most raPoolChunks buffers for the
// whole process; a reader that finds the pool empty reads directly.
const (
	// raChunkSize is the size of one read ahead: a multiple of the 1 MiB
	// requests of the kernel, so that aligned requests fall in one chunk,
	// and large enough that the layer files see large preads.
	raChunkSize = 2 << 20
	// raInitial and raMax are how many chunks a reader has in flight or
	// ready ahead of it: raInitial when it starts reading sequentially, so
	// that a program that only reads a header costs little, doubling as
	// it consumes them up to raMax. 16 chunks of 2 MiB read a dense chain
	// cold faster than 8 of 2 MiB or 8 of 4 MiB (mountbench, case 1).
	raInitial = 2
	raMax     = 16
	// raPoolChunks bounds the chunks of every reader together: 48 MiB,
	// one sequential reader at full speed and others with less.
	raPoolChunks = 24
)

// chunkPool hands out buffers of one size, at most max of them at a time:
// the chunks read ahead here, and the writes queued by write_behind.go. Buffers that come back are kept for the next reader: memory
// that was touched once is cheaper to fill than new memory. They are mapped
// outside the Go heap: in it, they would double the garbage collector's
// heap goal, and the mount's resident memory with it.
type chunkPool struct {
	size int
	max  int

	mu    sync.Mutex // protects the fields below
	inUse int
	free  [][]byte
}

// raPool is shared by every mount of the process: the bound is on the
// process's memory, however many filesystems it serves.
var raPool = &chunkPool{size: raChunkSize, max: raPoolChunks}

// get returns a buffer, or nil when max are in use (or no memory can be
// mapped: the reader then reads directly).
func (p *chunkPool) get() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inUse == p.max {
		return nil
	}
	if n := len(p.free); n > 0 {
		p.inUse++
		b := p.free[n-1]
		p.free = p.free[:n-1]
		return b
	}
	b, err := mapBuffer(p.size)
	if err != nil {
		return nil
	}
	p.inUse++
	return b
}

// hugePage is the size of a transparent huge page (amd64, arm64 with 4 KiB
// pages).
const hugePage = 2 << 20

// mapBuffer maps size bytes of anonymous memory. A size in whole huge pages
// is aligned to them and asked to be backed by them (MADV_HUGEPAGE: the
// kernel's default THP mode, madvise, gives them only when asked): every
// byte read through a chunk is copied twice, once in by librbd (or the
// kernel, for a local file) and once out by the kernel into the reader's
// buffer, pinning each source page first, and with 4 KiB pages that costs
// 512 page walks and TLB misses per 2 MiB where a huge page costs one. On a
// 2 GiB RBD read through the mount (rbdbench case 1), it saved about a
// tenth of the mount's CPU time. Where no huge page is free the kernel
// falls back to small pages. The mapping is one huge page larger than the
// buffer, to align it; the slack is never touched, so it takes address
// space only.
func mapBuffer(size int) ([]byte, error) {
	if size%hugePage != 0 {
		return syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	}
	b, err := syscall.Mmap(-1, 0, size+hugePage, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	skip := (hugePage - int(uintptr(unsafe.Pointer(&b[0]))%hugePage)) % hugePage
	b = b[skip : skip+size : skip+size]
	// Only advice: a kernel without THP refuses it, and small pages work.
	_ = syscall.Madvise(b, syscall.MADV_HUGEPAGE)
	return b, nil
}

func (p *chunkPool) put(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inUse--
	p.free = append(p.free, b[:p.size])
}

// used returns how many buffers are handed out.
func (p *chunkPool) used() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inUse
}

// chunk is one chunk read ahead: [off, off+n) of the file once done
// is closed. Its buffer goes back to the pool when the last reference is
// dropped: the read-ahead window holds one while the chunk is in it, the
// goroutine that fills it one until it is filled, and each reply that
// points into it one until go-fuse has written it (ReadResult.Done).
type chunk struct {
	pool *chunkPool
	off  int64
	buf  []byte
	refs atomic.Int32
	done chan struct{}
	// n and err are set before done is closed.
	n   int
	err error
}

func (c *chunk) unref() {
	if c.refs.Add(-1) == 0 {
		c.pool.put(c.buf)
		c.buf = nil
	}
}

// data returns the bytes of the chunk at [off, off+length), clipped to
// what the chunk holds; ok is false when the chunk could not be read.
// done must be closed.
func (c *chunk) data(off int64, length int) (b []byte, ok bool) {
	if c.err != nil && !(errors.Is(c.err, io.EOF) && c.n > 0) {
		return nil, false
	}
	start := off - c.off
	end := min(start+int64(length), int64(c.n))
	if start >= end {
		return nil, false
	}
	return c.buf[start:end], true
}

// chunkReply is a read answered from a chunk: go-fuse writes b straight
// from the chunk's buffer and then calls Done, which drops the reference.
type chunkReply struct {
	c *chunk
	b []byte
}

func (r *chunkReply) Size() int                          { return len(r.b) }
func (r *chunkReply) Bytes([]byte) ([]byte, fuse.Status) { return r.b, fuse.OK }
func (r *chunkReply) Done()                              { r.c.unref() }

var _ fuse.ReadResult = (*chunkReply)(nil)

// readahead serves the reads of one open file of an immutable export,
// reading ahead for a sequential reader. Reads at other offsets go to the
// export directly and stop the read-ahead until the reader is sequential
// again. It is safe for concurrent use.
type readahead struct {
	r    io.ReaderAt
	size int64
	pool *chunkPool
	// fill counts the goroutines filling chunks, so that close can wait
	// for them before the export is closed under them.
	fill sync.WaitGroup

	mu sync.Mutex // protects the fields below
	// window holds the chunks read ahead, contiguous and in file order;
	// next is where the chunk after them starts.
	window []*chunk
	next   int64
	ahead  int   // how many chunks the window may hold now
	last   int64 // where the previous read ended: the next sequential read starts there
	closed bool
}

func newReadahead(r io.ReaderAt, size int64, pool *chunkPool) *readahead {
	return &readahead{r: r, size: size, pool: pool}
}

// read answers a read of dest at off, with dest already clipped to the
// file. The reply may point into a chunk rather than into dest.
func (ra *readahead) read(dest []byte, off int64) (fuse.ReadResult, error) {
	c := ra.lookup(off, len(dest))
	if c == nil {
		return ra.direct(dest, off)
	}
	<-c.done
	b, ok := c.data(off, len(dest))
	if !ok {
		// The chunk failed: the direct read reports the error, or
		// succeeds if it was passing.
		c.unref()
		return ra.direct(dest, off)
	}
	if len(b) == len(dest) {
		return &chunkReply{c: c, b: b}, nil
	}
	// The read runs past the chunk (an unaligned reader): copy what the
	// chunk holds and read the rest directly.
	n := copy(dest, b)
	c.unref()
	if _, err := ra.readFull(dest[n:], off+int64(n)); err != nil {
		return nil, err
	}
	return fuse.ReadResultData(dest), nil
}

// direct reads dest at off from the export, without read-ahead.
func (ra *readahead) direct(dest []byte, off int64) (fuse.ReadResult, error) {
	n, err := ra.readFull(dest, off)
	if err != nil {
		return nil, err
	}
	return fuse.ReadResultData(dest[:n]), nil
}

func (ra *readahead) readFull(dest []byte, off int64) (int, error) {
	n, err := ra.r.ReadAt(dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
		return n, err
	}
	return n, nil
}

// lookup returns the chunk that holds off, referenced for the caller, and
// moves the window on: the chunks before off are dropped and new ones are
// started up to the window's size. It returns nil when the read is to be
// answered directly.
func (ra *readahead) lookup(off int64, length int) *chunk {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	sequential := off == ra.last
	ra.last = off + int64(length)
	if ra.closed || off >= ra.size {
		return nil
	}
	// Drop the chunks that end at or before off: consumed, or skipped.
	consumed := false
	for len(ra.window) > 0 && ra.window[0].off+int64(ra.pool.size) <= off {
		ra.window[0].unref()
		ra.window = ra.window[1:]
		consumed = true
	}
	switch {
	case len(ra.window) > 0 && ra.window[0].off > off:
		// Behind the window: the reader went back.
		ra.dropWindow()
		return nil
	case len(ra.window) > 0:
		// In the window: the reader is where it was expected.
		if consumed {
			ra.ahead = min(ra.ahead*2, raMax)
		}
	case !sequential:
		// Elsewhere: a random reader, or one that skipped ahead.
		ra.dropWindow()
		return nil
	default:
		// Sequential, and nothing read ahead covers off (a new run, or
		// the pool ran dry): start the window at the read itself.
		ra.next = off
		if ra.ahead == 0 {
			ra.ahead = raInitial
		}
	}
	for len(ra.window) < ra.ahead && ra.next < ra.size {
		if !ra.start(ra.next) {
			break
		}
		ra.next += int64(ra.pool.size)
	}
	if len(ra.window) == 0 {
		return nil
	}
	c := ra.window[0]
	c.refs.Add(1)
	return c
}

// start starts reading the chunk at off; false when the pool is empty.
func (ra *readahead) start(off int64) bool {
	buf := ra.pool.get()
	if buf == nil {
		return false
	}
	c := &chunk{pool: ra.pool, off: off, buf: buf, done: make(chan struct{})}
	c.refs.Store(2) // the window's and the filling goroutine's
	ra.window = append(ra.window, c)
	ra.fill.Add(1)
	go func() {
		defer ra.fill.Done()
		c.n, c.err = ra.r.ReadAt(c.buf[:min(int64(len(c.buf)), ra.size-off)], off)
		close(c.done)
		c.unref()
	}()
	return true
}

// dropWindow drops every chunk read ahead; those still being filled go
// back to the pool once they are.
func (ra *readahead) dropWindow() {
	for _, c := range ra.window {
		c.unref()
	}
	ra.window = nil
	ra.ahead = 0
}

// close drops the window and waits for the chunks being filled, so that
// the export can be closed. Replies still being written keep their chunk
// until go-fuse is done with them.
func (ra *readahead) close() {
	ra.mu.Lock()
	ra.closed = true
	ra.dropWindow()
	ra.mu.Unlock()
	ra.fill.Wait()
}
