package qcow

import (
	"context"
	"fmt"
	"os"
	"sync"
)

// writeStream writes a qcow2 file whose data clusters are only known once
// read: compressed clusters (their sizes), or clusters compared with a base.
// Workers read, compare and compress chunks in parallel; one writer appends
// their clusters in guest order, then writes the metadata after them.
func writeStream(ctx context.Context, dst *os.File, src Image, opts ConvertOptions) error {
	bits, err := clusterSizeBits(opts.ClusterSize)
	if err != nil {
		return err
	}
	if opts.Base != nil && opts.BackingName == "" {
		return fmt.Errorf("%w: an overlay on a base needs a backing file name", ErrUnsupported)
	}
	compress := opts.Compress
	if compress == nil {
		compress = DefaultCompressor
	}
	overlay := opts.BackingName != ""
	candidates, err := streamCandidates(src, opts, bits, overlay)
	if err != nil {
		return err
	}
	cs := int64(1) << bits
	perChunk := max(1, copyChunk/cs)
	var chunks []clusterRun // candidate clusters, cut into chunks
	var total int64
	for _, r := range candidates {
		for g := r.guest; g < r.guest+r.count; g += perChunk {
			chunks = append(chunks, clusterRun{guest: g, count: min(perChunk, r.guest+r.count-g), kind: r.kind})
			total += min(perChunk, r.guest+r.count-g) * cs
		}
	}
	w := &streamWriter{dst: dst, bits: bits, pos: cs}
	if opts.Compression != nil {
		w.compression = *opts.Compression
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	workers := copyWorkers()
	results := make([]chan chunkResult, len(chunks))
	for i := range results {
		results[i] = make(chan chunkResult, 1)
	}
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				results[i] <- encodeChunk(src, opts, compress, bits, overlay, chunks[i])
			}
		}()
	}
	go func() {
		defer close(jobs)
		// At most 2*workers chunks are read ahead of the writer.
		for i := range chunks {
			if i >= 2*workers {
				select {
				case <-w.written(i - 2*workers):
				case <-ctx.Done():
					return
				}
			}
			select {
			case jobs <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	var done int64
	for i := range chunks {
		var res chunkResult
		select {
		case res = <-results[i]:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		if res.err == nil {
			res.err = w.append(res.clusters)
		}
		w.markWritten(i)
		if res.err != nil {
			cancel()
			wg.Wait()
			return res.err
		}
		done += chunks[i].count * cs
		if opts.Progress != nil {
			opts.Progress(done, total)
		}
	}
	wg.Wait()
	return w.finish(src.Size(), opts.BackingName, opts.BackingFormat)
}

// streamCandidates lists the guest clusters that may need storing.
func streamCandidates(src Image, opts ConvertOptions, bits uint32, overlay bool) ([]clusterRun, error) {
	delta := opts.Delta
	if delta == nil {
		var err error
		if delta, err = src.Extents(0, src.Size()); err != nil {
			return nil, err
		}
	}
	if opts.Base == nil {
		return planClusters(delta, bits, overlay), nil
	}
	// Compared with a base: a cluster may differ where either side has
	// anything but holes, so both maps count, as data to be compared.
	baseExt, err := opts.Base.Extents(0, min(opts.Base.Size(), src.Size()))
	if err != nil {
		return nil, err
	}
	all := append(append([]Extent{}, delta...), baseExt...)
	for i := range all {
		all[i].Kind = Data
	}
	return planClusters(all, bits, false), nil
}

// encodedCluster is one output cluster ready to append.
type encodedCluster struct {
	guest int64
	kind  unitKind // unitData (data holds the cluster), unitZero, unitCompressed
	data  []byte
}

type chunkResult struct {
	clusters []encodedCluster
	err      error
}

// encodeChunk reads one chunk of candidate clusters and decides how each is
// stored.
func encodeChunk(src Image, opts ConvertOptions, compress Compressor, bits uint32, overlay bool, r clusterRun) chunkResult {
	cs := int64(1) << bits
	if r.kind == unitZero {
		out := make([]encodedCluster, r.count)
		for i := range out {
			out[i] = encodedCluster{guest: r.guest + int64(i), kind: unitZero}
		}
		return chunkResult{clusters: out}
	}
	buf := make([]byte, r.count*cs)
	if err := readFull(src, buf, r.guest*cs); err != nil {
		return chunkResult{err: err}
	}
	var base []byte
	if opts.Base != nil {
		base = make([]byte, len(buf))
		if err := readFull(opts.Base, base, r.guest*cs); err != nil {
			return chunkResult{err: fmt.Errorf("reading base: %w", err)}
		}
		// The base reads as zeros past its end.
		if end := opts.Base.Size() - r.guest*cs; end < int64(len(base)) {
			clear(base[max(0, end):])
		}
	}
	var out []encodedCluster
	for i := int64(0); i < r.count; i++ {
		c := buf[i*cs : (i+1)*cs]
		g := r.guest + i
		if base != nil && string(c) == string(base[i*cs:(i+1)*cs]) {
			continue // reads the same through the backing file
		}
		if allZero(c) {
			if overlay {
				out = append(out, encodedCluster{guest: g, kind: unitZero})
			}
			continue
		}
		if opts.Compression != nil {
			z, ok, err := compress(*opts.Compression, make([]byte, 0, cs), c, int(cs))
			if err != nil {
				return chunkResult{err: err}
			}
			if ok {
				out = append(out, encodedCluster{guest: g, kind: unitCompressed, data: z})
				continue
			}
		}
		out = append(out, encodedCluster{guest: g, kind: unitData, data: c})
	}
	return chunkResult{clusters: out}
}

// streamWriter appends clusters to a qcow2 file and keeps what the metadata
// needs. Only the writer goroutine touches it, except the written signals.
type streamWriter struct {
	dst         *os.File
	bits        uint32
	compression Compression
	pos         int64 // next free byte
	runs        []clusterRun
	refs        []uint16 // refcounts of the data clusters, from host cluster 1

	mu      sync.Mutex // protects signals
	signals map[int]chan struct{}
	last    int // chunks before this one are written
}

// written returns a channel closed once chunk i is written.
func (w *streamWriter) written(i int) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if i < w.last {
		c := make(chan struct{})
		close(c)
		return c
	}
	if w.signals == nil {
		w.signals = map[int]chan struct{}{}
	}
	if w.signals[i] == nil {
		w.signals[i] = make(chan struct{})
	}
	return w.signals[i]
}

func (w *streamWriter) markWritten(i int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.last = i + 1
	if c := w.signals[i]; c != nil {
		close(c)
		delete(w.signals, i)
	}
}

// maxSharedRefs bounds how many compressed clusters share one host cluster,
// so that 16-bit refcounts never overflow.
const maxSharedRefs = 1<<16 - 1

func (w *streamWriter) append(clusters []encodedCluster) error {
	cs := int64(1) << w.bits
	for _, c := range clusters {
		switch c.kind {
		case unitZero:
			w.addRun(clusterRun{guest: c.guest, count: 1, kind: unitZero})
		case unitData:
			w.pos = (w.pos + cs - 1) &^ (cs - 1)
			if _, err := w.dst.WriteAt(c.data, w.pos); err != nil {
				return err
			}
			host := w.pos >> w.bits
			w.ref(host)
			w.addRun(clusterRun{guest: c.guest, count: 1, kind: unitData, host: host})
			w.pos += cs
		case unitCompressed:
			if h := w.pos >> w.bits; w.pos&(cs-1) != 0 && w.refcount(h) >= maxSharedRefs {
				w.pos = (h + 1) << w.bits
			}
			if _, err := w.dst.WriteAt(c.data, w.pos); err != nil {
				return err
			}
			end := w.pos + int64(len(c.data))
			for h := w.pos >> w.bits; h <= (end-1)>>w.bits; h++ {
				w.ref(h)
			}
			entry := makeCompressedEntry(w.bits, w.pos, int64(len(c.data)))
			w.runs = append(w.runs, clusterRun{guest: c.guest, count: 1, kind: unitCompressed, host: int64(entry)})
			w.pos = end
		}
	}
	return nil
}

func (w *streamWriter) refcount(host int64) uint16 {
	if i := host - 1; i < int64(len(w.refs)) {
		return w.refs[i]
	}
	return 0
}

func (w *streamWriter) ref(host int64) {
	for int64(len(w.refs)) < host {
		w.refs = append(w.refs, 0)
	}
	w.refs[host-1]++
}

// addRun appends a data or zero cluster, merging it with the run before.
func (w *streamWriter) addRun(r clusterRun) {
	if n := len(w.runs); n > 0 {
		last := &w.runs[n-1]
		if last.kind == r.kind && last.guest+last.count == r.guest && (r.kind == unitZero || last.host+last.count == r.host) {
			last.count++
			return
		}
	}
	w.runs = append(w.runs, r)
}

// finish writes the metadata after the data.
func (w *streamWriter) finish(virtualSize int64, backingName, backingFormat string) error {
	cs := int64(1) << w.bits
	dataClusters := (w.pos+cs-1)>>w.bits - 1
	for int64(len(w.refs)) < dataClusters {
		w.refs = append(w.refs, 0)
	}
	lo, err := newLayout(w.bits, virtualSize, w.runs, dataClusters, w.refs, w.compression, backingName, backingFormat)
	if err != nil {
		return err
	}
	cluster := make([]byte, cs)
	write := func(index int64) error {
		lo.renderCluster(cluster, index)
		_, err := w.dst.WriteAt(cluster, index<<w.bits)
		return err
	}
	if err := write(0); err != nil {
		return err
	}
	for index := lo.l2Start; index < lo.total; index++ {
		if err := write(index); err != nil {
			return err
		}
	}
	return w.dst.Truncate(lo.size())
}
