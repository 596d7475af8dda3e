package fs

import (
	"os"
	"sync"

	"snapfs/internal/directio"
)

// Write-behind for the staging files of imports.
//
// cp writes import/NAME one request at a time, and waits for each before
// it reads the next block of its source: written synchronously, the copy
// into the staging file's page cache (the costliest step, new pages to
// fill) runs while cp waits, and cp's reads while the file waits. So a
// write is copied into a buffer and answered at once, and one goroutine
// per file writes the buffers in order behind it, as qemu-img convert
// keeps its writes in flight while it reads.
//
// The writes the goroutine makes are direct (O_DIRECT, internal/directio)
// when the file's filesystem takes them, for the whole pages of a write at
// an aligned offset (all of cp's writes but its last): no page cache
// is filled, so the goroutine's CPU stays free for cp, the disk is busy
// while cp reads, and the store's fsync of the file finds nothing left to
// write. mountbench's case 4 (cp against qemu-img convert), run in turns
// with buffered writes behind cp: 1.10 and 0.91 against 0.91 and 0.75; an
// earlier version found direct writes that cp waited for slower than
// buffered ones (the disk idled while cp read); session 8 measured
// buffered writes a little faster (0.62-1.05 against 0.58-0.62): noise
// decides, re-measure before changing. Other writes go through the page
// cache; the kernel keeps the two coherent.
//
// The first failure (a full disk) is kept: the next write, the import
// (closeWrite) and fsync return it, so cp and close(2) report it.
// Everything that reads the file or its size waits for the writes
// queued before it (drain). Memory is bounded: buffers come from one pool
// for the whole process, and a write that finds it empty is written
// directly, after the writes before it.

// writePoolBuffers is how many writes all the imports of the process
// may have queued (16 MiB of 1 MiB requests), and fileQueue how many one
// file may: enough to keep its writing goroutine busy while cp reads. A
// writer that is further ahead waits for the oldest of its writes.
const (
	writePoolBuffers = 16
	fileQueue        = 8
)

// writePool is shared by every mount of the process, as raPool is.
var writePool = &chunkPool{size: ioBlockSize, max: writePoolBuffers}

// writeBehind writes to one file behind its writer. Its methods are not
// safe for concurrent use (stagedFile's owner serialises them), but they
// run concurrently with the goroutine that writes.
type writeBehind struct {
	f *os.File
	// out writes the queued writes to f, directly where it can: only
	// the writing goroutine uses it.
	out  *directio.Writer
	pool *chunkPool
	// queue holds the writes not yet written, in the order they came,
	// at most fileQueue: a send waits while it is full.
	queue chan queuedWrite
	// pending counts the writes queued and not yet written.
	pending sync.WaitGroup
	// stopped is closed when the writing goroutine has ended.
	stopped chan struct{}

	mu  sync.Mutex // protects err
	err error      // the first write that failed
}

// queuedWrite is one write waiting for its turn: buf[:n] at off.
type queuedWrite struct {
	buf []byte
	n   int
	off int64
}

func newWriteBehind(f *os.File, out *directio.Writer, pool *chunkPool) *writeBehind {
	w := &writeBehind{f: f, out: out, pool: pool, queue: make(chan queuedWrite, fileQueue), stopped: make(chan struct{})}
	go w.run()
	return w
}

// write writes one queued write, directly where it can (the buffers,
// from the pool, are mapped pages). Only run calls it: out is the writing
// goroutine's.
func (w *writeBehind) write(q queuedWrite) error {
	return w.out.WriteAt(q.buf[:q.n], q.off)
}

// run writes the queued writes in order until the queue is closed. Once
// one has failed, the rest are dropped: the file is broken, and the
// failure is what the writer hears of next.
func (w *writeBehind) run() {
	defer close(w.stopped)
	for q := range w.queue {
		if w.failed() == nil {
			if err := w.write(q); err != nil {
				w.fail(err)
			}
		}
		w.pool.put(q.buf)
		w.pending.Done()
	}
}

func (w *writeBehind) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *writeBehind) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
}

// WriteAt queues p for writing at off and returns, once the queue has
// room, or writes it now when the pool has no buffer free (other files
// have them all). It returns the failure of an earlier write, if one
// failed, and then writes nothing.
func (w *writeBehind) WriteAt(p []byte, off int64) (int, error) {
	if err := w.failed(); err != nil {
		return 0, err
	}
	var buf []byte
	if len(p) <= w.pool.size {
		buf = w.pool.get()
	}
	if buf == nil {
		if err := w.drain(); err != nil {
			return 0, err
		}
		n, err := w.f.WriteAt(p, off)
		if err != nil {
			w.fail(err)
		}
		return n, err
	}
	n := copy(buf, p)
	w.pending.Add(1)
	w.queue <- queuedWrite{buf: buf, n: n, off: off}
	return n, nil
}

// drain waits for the writes queued so far, and returns the first
// failure.
func (w *writeBehind) drain() error {
	w.pending.Wait()
	return w.failed()
}

// stop drains the queue and ends the writing goroutine; the writeBehind
// takes no more writes.
func (w *writeBehind) stop() error {
	err := w.drain()
	close(w.queue)
	<-w.stopped
	return err
}
