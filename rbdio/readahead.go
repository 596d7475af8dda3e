//go:build ceph && cgo

package rbdio

import "sync"

// A sequential reader of a snapshot (cp, cat of disk.raw through FUSE)
// sends one request of 128 KiB to 1 MiB at a time: read one by one from
// librbd, that is a fraction of what the cluster gives with several
// requests in flight (rbd export keeps 10). So a snapshot, which never
// changes, is read ahead in aligned chunks, several at once, ahead of a
// reader that goes forward; other reads go straight to librbd.
const (
	raChunk = 4 << 20 // the unit of readahead, aligned to it
	// raMaxWindow is how many chunks are fetched ahead of the reader at
	// most; the window starts at one and doubles while the reader keeps
	// going forward, so a reader of a few blocks costs one chunk.
	raMaxWindow = 8
	// raMaxChunks bounds the memory of one image: 64 MiB.
	raMaxChunks = 2*raMaxWindow + 2
)

// readahead is the readahead state of one snapshot image.
//
// Fetches run in goroutines that take no lock of the image (a reader that
// holds closeMu waits for them); Close waits for them through wg before
// it closes the layers.
type readahead struct {
	mu     sync.Mutex // protects the fields below
	next   int64      // where a sequential reader reads next
	window int64      // chunks to have ahead of it
	at     int64      // the chunk where the last sequential read ended
	chunks map[int64]*chunk
	wg     sync.WaitGroup // fetches in flight
}

// chunk is one aligned chunk of the image, fetched or being fetched.
type chunk struct {
	ready chan struct{} // closed once data or err is set
	data  []byte
	err   error
}

// read serves buf at off from chunks read ahead, starting fetches as the
// reader goes forward. It returns false, having read nothing, for a read
// that is neither sequential nor in a chunk: the caller reads it directly.
// A fetch that fails while the read waits for it is the read's error, and
// is forgotten: the next read of the chunk fetches it again. One that had
// failed before the read came is fetched again at once: its error is
// stale (the cluster may have come back since) and no reader saw it.
func (ra *readahead) read(im *image, buf []byte, off int64) (bool, error) {
	if len(buf) == 0 {
		return false, nil
	}
	first, last := off/raChunk, (off+int64(len(buf))-1)/raChunk
	ra.mu.Lock()
	if ra.chunks == nil {
		ra.chunks = map[int64]*chunk{}
	}
	sequential := off == ra.next
	// A read of half a chunk or more comes from a reader that reads
	// ahead itself (the mount does, 2 MiB at a time, several at once):
	// unless chunks read ahead already hold it, it goes straight to
	// librbd rather than being read twice.
	large := len(buf) >= raChunk/2
	if (!sequential || large) && ra.chunks[first] == nil {
		ra.next = off + int64(len(buf))
		ra.window = 0
		ra.mu.Unlock()
		return false, nil
	}
	if sequential && (ra.window == 0 || last > ra.at) {
		// Forward into a new chunk: widen the window.
		ra.window = min(max(2*ra.window, 1), raMaxWindow)
	}
	ra.at = last
	ra.next = off + int64(len(buf))
	nchunks := (im.size + raChunk - 1) / raChunk
	for i := first; i <= last+ra.window && i < nchunks; i++ {
		if c := ra.chunks[i]; c == nil || c.failed() {
			ra.chunks[i] = ra.fetch(im, i)
		}
	}
	// Drop chunks behind the reader (one is kept, for requests that
	// arrive a little out of order), then the farthest if there are
	// still too many (several readers).
	for i := range ra.chunks {
		if i < first-1 || i > last+raMaxWindow+1 {
			delete(ra.chunks, i)
		}
	}
	for len(ra.chunks) > raMaxChunks {
		far := first
		for i := range ra.chunks {
			if abs(i-first) > abs(far-first) {
				far = i
			}
		}
		delete(ra.chunks, far)
	}
	need := make([]*chunk, 0, last-first+1)
	for i := first; i <= last; i++ {
		need = append(need, ra.chunks[i])
	}
	ra.mu.Unlock()

	for k, c := range need {
		<-c.ready
		if c.err != nil {
			ra.mu.Lock()
			if ra.chunks[first+int64(k)] == c {
				delete(ra.chunks, first+int64(k))
			}
			ra.mu.Unlock()
			return true, c.err
		}
	}
	for k, c := range need {
		start := (first + int64(k)) * raChunk
		lo := max(off, start)
		hi := min(off+int64(len(buf)), start+int64(len(c.data)))
		copy(buf[lo-off:hi-off], c.data[lo-start:hi-start])
	}
	return true, nil
}

// failed reports whether c's fetch is over and failed.
func (c *chunk) failed() bool {
	select {
	case <-c.ready:
		return c.err != nil
	default:
		return false
	}
}

// fetch starts reading chunk i; the caller holds ra.mu and a read lock of
// im.closeMu, so Close has not begun and will wait for it.
func (ra *readahead) fetch(im *image, i int64) *chunk {
	c := &chunk{ready: make(chan struct{})}
	ra.wg.Add(1)
	go func() {
		defer ra.wg.Done()
		defer close(c.ready)
		data := make([]byte, min(raChunk, im.size-i*raChunk))
		if c.err = im.readDirect(data, i*raChunk); c.err == nil {
			c.data = data
		}
	}()
	return c
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}
