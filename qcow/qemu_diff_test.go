package qcow_test

// Differential tests of the reader: images made by qemu-img and qemu-io with
// every feature the reader claims, read by us and by qemu, compared byte for
// byte (qemu-img convert -O raw) and range for range (qemu-img map).

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// readerCase is one image to compare: build makes it in dir and returns the
// path of its top layer.
type readerCase struct {
	name  string
	build func(t *testing.T, dir string) string
	// check, when set, runs extra checks on the opened chain.
	check func(t *testing.T, path string, c *qcow.Chain)
}

// randomFile writes n pseudo-random bytes (reproducible from seed) to a new
// file in dir, for qemu-io `write -s FILE`: random data catches misplaced
// bytes that a constant pattern would hide.
func randomFile(t *testing.T, dir string, n int, seed uint64) string {
	t.Helper()
	data := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	path := filepath.Join(dir, fmt.Sprintf("random-%d-%d", n, seed))
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// compressibleFile writes n bytes that compress well but are not constant:
// random bytes from a 16-letter alphabet, with runs of zeros.
func compressibleFile(t *testing.T, dir string, n int, seed uint64) string {
	t.Helper()
	data := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 0xc0de))
	for i := 0; i < n; {
		run := 1 + r.IntN(3000)
		if r.IntN(4) == 0 {
			i += run // leave zeros
			continue
		}
		for j := i; j < min(i+run, n); j++ {
			data[j] = 'a' + byte(r.IntN(16))
		}
		i += run
	}
	path := filepath.Join(dir, fmt.Sprintf("text-%d-%d", n, seed))
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeRandom returns a qemu-io command writing length random bytes at off.
func writeRandom(t *testing.T, dir string, off, length int64, seed uint64) string {
	return fmt.Sprintf("write -s %s %d %d", randomFile(t, dir, int(length), seed), off, length)
}

// removeBackingFormat turns the backing format extension of a qcow2 image
// into an unknown one, which every reader ignores: the image then names its
// backing file without a format, as images made by old qemu versions do
// (qemu-img 7 refuses to create such images).
func removeBackingFormat(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	off := 72
	if be.Uint32(data[4:]) == 3 {
		off = int(be.Uint32(data[100:]))
	}
	for off+8 <= len(data) {
		typ, n := be.Uint32(data[off:]), int(be.Uint32(data[off+4:]))
		if typ == 0 {
			break
		}
		if typ == 0xe2792aca {
			be.PutUint32(data[off:], 0x0bad0bad)
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		off += 8 + (n+7)&^7
	}
	t.Fatalf("%s has no backing format extension", path)
}

func readerCases() []readerCase {
	var cases []readerCase
	add := func(c readerCase) { cases = append(cases, c) }

	// Cluster sizes from the smallest to the largest qemu allows, in both
	// versions, with virtual sizes that end inside a cluster, small writes
	// across cluster and L2 table boundaries, zero writes and discards.
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []int64{512, 4 << 10, 64 << 10, 2 << 20} {
			add(readerCase{
				name: fmt.Sprintf("compat=%s/cluster=%d", compat, cs),
				build: func(t *testing.T, dir string) string {
					// An L2 table maps cs*cs/8 bytes: cross a table boundary
					// where that keeps the image small (cs <= 4 KiB).
					l2Span := cs * cs / 8
					if l2Span > 4<<20 {
						l2Span = 2 * cs
					}
					size := max(3*cs, l2Span+2*cs) + cs/2 + 1536
					if cs == 512 {
						size = l2Span*3 + 1536
					}
					img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), fmt.Sprint(size),
						"-o", fmt.Sprintf("compat=%s,cluster_size=%d", compat, cs))
					qemutest.IO(t, img,
						writeRandom(t, dir, 0, 3*cs/2+700, 1),
						writeRandom(t, dir, l2Span-cs/2-512, cs+1024, 2),
						writeRandom(t, dir, size-cs-512, cs+512, 3), // the last, partial cluster
						"write -P 0x5a "+fmt.Sprint(2*cs)+" "+fmt.Sprint(cs),
						"write -z "+fmt.Sprint(cs)+" "+fmt.Sprint(cs),
						"discard "+fmt.Sprint(2*cs)+" "+fmt.Sprint(cs),
					)
					return img
				},
			})
		}
	}

	// Every refcount width: the reader must not care.
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		add(readerCase{
			name: fmt.Sprintf("refcount_bits=%d", bits),
			build: func(t *testing.T, dir string) string {
				img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "1M",
					"-o", fmt.Sprintf("refcount_bits=%d,cluster_size=4k", bits))
				qemutest.IO(t, img, writeRandom(t, dir, 5000, 300000, uint64(bits)), "write -z 100k 8k", "discard 200k 4k")
				return img
			},
		})
	}

	// A chain of 5 qcow2 layers of different sizes, each writing over the
	// ones below; the top names its backing format, one middle layer does
	// not (it is probed).
	add(readerCase{
		name: "chain/depth=5",
		build: func(t *testing.T, dir string) string {
			sizes := []string{"1M", "3M", "2M", "4M", "4M"} // bottom first
			var prev string
			for i, size := range sizes {
				img := filepath.Join(dir, fmt.Sprintf("layer%d.qcow2", i))
				var opts []string
				if i%2 == 1 {
					opts = append(opts, "-o", "cluster_size=4k")
				}
				if prev != "" {
					opts = append(opts, "-b", filepath.Base(prev), "-F", "qcow2")
				}
				qemutest.Create(t, "qcow2", img, size, opts...)
				off := int64(i) * 300 << 10
				qemutest.IO(t, img,
					writeRandom(t, dir, off, 700<<10, uint64(10+i)),
					fmt.Sprintf("write -z %d 64k", off+200<<10),
					fmt.Sprintf("discard %d 128k", off+512<<10),
				)
				if i == 2 {
					removeBackingFormat(t, img)
				}
				prev = img
			}
			return prev
		},
		check: func(t *testing.T, path string, c *qcow.Chain) {
			if c.Depth() != 5 {
				t.Errorf("Depth = %d, want 5", c.Depth())
			}
		},
	})

	// qcow2 over a raw file that is shorter than the overlay and not a
	// multiple of the cluster size.
	add(readerCase{
		name: "chain/over-short-raw",
		build: func(t *testing.T, dir string) string {
			raw := randomFile(t, dir, 1<<20+12345, 20)
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "3M", "-b", filepath.Base(raw), "-F", "raw")
			qemutest.IO(t, img, writeRandom(t, dir, 1<<20-1000, 5000, 21), "write -z 64k 64k")
			return img
		},
	})

	// A qcow2 backing layer shorter than its overlay, with data up to its
	// last byte: the overlay reads zeros past it.
	add(readerCase{
		name: "chain/over-short-qcow2",
		build: func(t *testing.T, dir string) string {
			base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
			qemutest.IO(t, base, writeRandom(t, dir, 0, 1<<20, 30))
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "3M", "-b", "base.qcow2", "-F", "qcow2")
			qemutest.IO(t, img, writeRandom(t, dir, 512<<10, 4096, 31))
			return img
		},
	})

	// Zero clusters: over data in the backing file, plain and preallocated,
	// with and without unmapping.
	add(readerCase{
		name: "zero/over-backing",
		build: func(t *testing.T, dir string) string {
			base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "2M")
			qemutest.IO(t, base, writeRandom(t, dir, 0, 2<<20, 40))
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "2M", "-b", "base.qcow2", "-F", "qcow2")
			qemutest.IO(t, img,
				writeRandom(t, dir, 0, 1<<20, 41),
				"write -z 0 64k",       // over allocated data: stays allocated, zero flag
				"write -z -u 128k 64k", // unmapped: plain zero cluster
				"write -z 1M 128k",     // over backing data only
				"write -z 1500k 1000",  // partial cluster: written as data
				"discard 512k 64k",
			)
			return img
		},
	})
	add(readerCase{
		name: "zero/preallocation=metadata",
		build: func(t *testing.T, dir string) string {
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "2M", "-o", "preallocation=metadata")
			qemutest.IO(t, img, writeRandom(t, dir, 100<<10, 200<<10, 50), "write -z 128k 64k", "write -z -u 1M 64k", "discard 1536k 64k")
			return img
		},
	})
	add(readerCase{
		name: "zero/preallocation=full",
		build: func(t *testing.T, dir string) string {
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "1M", "-o", "preallocation=full,cluster_size=4k")
			qemutest.IO(t, img, writeRandom(t, dir, 1000, 50000, 51), "write -z 64k 16k")
			return img
		},
	})

	// Compressed clusters, both types, written by convert -c and by
	// qemu-io write -c, at several cluster sizes; and under an overlay that
	// rewrites parts of them.
	for _, comp := range []string{"zlib", "zstd"} {
		for _, cs := range []int64{4 << 10, 64 << 10, 2 << 20} {
			add(readerCase{
				name: fmt.Sprintf("compressed/%s/cluster=%d", comp, cs),
				build: func(t *testing.T, dir string) string {
					src := compressibleFile(t, dir, 5<<20+3*512, uint64(cs))
					img := filepath.Join(dir, "img.qcow2")
					qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", "-c",
						"-o", fmt.Sprintf("compression_type=%s,cluster_size=%d", comp, cs), src, img)
					// qemu writes compressed clusters only where nothing is
					// allocated: grow the image and write there.
					grown := (5<<20 + 3*512 + cs - 1) / cs * cs
					qemutest.Img(t, "resize", "-q", "-f", "qcow2", img, fmt.Sprint(grown+2*cs-512))
					qemutest.IO(t, img,
						fmt.Sprintf("write -c -s %s %d %d", compressibleFile(t, dir, int(cs), 99), grown, cs),
						writeRandom(t, dir, grown+cs+100, 1000, 60), // uncompressed
						writeRandom(t, dir, 100, 1000, 61),          // over a compressed cluster
					)
					return img
				},
			})
		}
		add(readerCase{
			name: "compressed/" + comp + "/under-overlay",
			build: func(t *testing.T, dir string) string {
				src := compressibleFile(t, dir, 1<<20, 70)
				base := filepath.Join(dir, "base.qcow2")
				qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type="+comp, src, base)
				img := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "1M", "-b", "base.qcow2", "-F", "qcow2")
				qemutest.IO(t, img, writeRandom(t, dir, 100000, 3000, 71), "write -c -P 3 256k 64k", "write -z 512k 64k")
				return img
			},
		})
	}

	// Extended L2 entries: 32 subclusters per cluster, written, zeroed and
	// discarded one by one, over a backing file so that unallocated
	// subclusters fall through to it.
	for _, cs := range []int64{16 << 10, 64 << 10, 2 << 20} {
		add(readerCase{
			name: fmt.Sprintf("extended_l2/cluster=%d", cs),
			build: func(t *testing.T, dir string) string {
				sub := cs / 32
				size := 4*cs + sub + 512
				base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), fmt.Sprint(size))
				qemutest.IO(t, base, writeRandom(t, dir, 0, size, 80))
				img := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), fmt.Sprint(size),
					"-o", fmt.Sprintf("extended_l2=on,cluster_size=%d", cs), "-b", "base.qcow2", "-F", "qcow2")
				qemutest.IO(t, img,
					writeRandom(t, dir, sub, sub, 81),          // one subcluster
					writeRandom(t, dir, 5*sub+100, 2*sub, 82),  // unaligned: partial subclusters
					writeRandom(t, dir, cs-sub, 2*sub, 83),     // across a cluster boundary
					fmt.Sprintf("write -z %d %d", 10*sub, sub), // zero subcluster in an allocated cluster
					fmt.Sprintf("write -z %d %d", cs+3*sub, 2*sub),
					fmt.Sprintf("discard %d %d", 5*sub, sub),
					fmt.Sprintf("write -c -P 9 %d %d", 2*cs, cs), // a compressed cluster
					writeRandom(t, dir, 4*cs, sub+512, 84),       // the last, partial cluster
				)
				return img
			},
		})
	}

	// Lazy refcounts and the dirty bit: qemu-io is killed after writing, so
	// the header still says dirty and the refcounts are stale.
	add(readerCase{
		name: "dirty/lazy_refcounts",
		build: func(t *testing.T, dir string) string {
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "2M", "-o", "lazy_refcounts=on")
			qemutest.IOCrash(t, img, writeRandom(t, dir, 1000, 300000, 90), "write -z 512k 64k")
			if !qemutest.ImgInfo(t, img).DirtyFlag {
				t.Fatal("qemu-io was killed but the image is not dirty")
			}
			return img
		},
		check: func(t *testing.T, path string, c *qcow.Chain) {
			info, err := c.Info()
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"dirty", "lazy_refcounts"} {
				if !slices.Contains(info.Layers[0].Features, f) {
					t.Errorf("Info features %v lack %q", info.Layers[0].Features, f)
				}
			}
		},
	})

	// Internal snapshots: the active layer is what reads; Info lists them.
	for _, compat := range []string{"0.10", "1.1"} {
		add(readerCase{
			name: "snapshots/compat=" + compat,
			build: func(t *testing.T, dir string) string {
				img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "2M", "-o", "compat="+compat)
				qemutest.IO(t, img, writeRandom(t, dir, 0, 1<<20, 100))
				qemutest.Img(t, "snapshot", "-c", "first", img)
				qemutest.IO(t, img, writeRandom(t, dir, 512<<10, 1<<20, 101), "discard 0 64k")
				qemutest.Img(t, "snapshot", "-c", "second one", img)
				qemutest.IO(t, img, "write -z 1M 64k", "write -P 7 1536k 4k")
				return img
			},
		})
	}

	// An external data file, trusted, plain and raw (guest offset = host
	// offset); the metadata stays in the qcow2 file.
	for _, raw := range []string{"off", "on"} {
		add(readerCase{
			name: "data_file/raw=" + raw,
			build: func(t *testing.T, dir string) string {
				img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "2M",
					// An absolute name: qemu-img create resolves a relative one
					// against its working directory.
					"-o", "data_file="+filepath.Join(dir, "img.data")+",data_file_raw="+raw)
				qemutest.IO(t, img, writeRandom(t, dir, 70000, 500000, 110), "write -z 1M 64k", "discard 128k 64k")
				return img
			},
		})
	}

	// A raw image on its own.
	add(readerCase{
		name: "raw",
		build: func(t *testing.T, dir string) string {
			return randomFile(t, dir, 3<<20+4096, 120)
		},
	})
	return cases
}

func TestReadMatchesQemu(t *testing.T) {
	for _, tc := range readerCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := tc.build(t, dir)
			c, err := qcow.OpenPath(path, qcow.Options{})
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			defer c.Close()
			want := qemutest.ConvertRaw(t, path)
			checkBytes(t, c, want)
			checkRandomReads(t, c, want)
			checkExtents(t, c, want, path)
			checkInfo(t, c, path)
			if tc.check != nil {
				tc.check(t, path, c)
			}
		})
	}
}

// checkBytes reads the whole image in chunks of an odd size, which puts the
// chunk boundaries everywhere in clusters and subclusters.
func checkBytes(t *testing.T, c *qcow.Chain, want []byte) {
	t.Helper()
	if c.Size() != int64(len(want)) {
		t.Fatalf("Size = %d, qemu-img convert gives %d bytes", c.Size(), len(want))
	}
	got := make([]byte, len(want))
	const chunk = 1<<20 - 4095
	for off := 0; off < len(got); off += chunk {
		end := min(off+chunk, len(got))
		if n, err := c.ReadAt(got[off:end], int64(off)); err != nil || n != end-off {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", end-off, off, n, err)
		}
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("flattened image differs from qemu-img convert at byte %d (%#x): got %#x, want %#x",
			i, i, got[i], want[i])
	}
	// Past the end: EOF, and a read straddling the end is short.
	buf := make([]byte, 1000)
	if n, err := c.ReadAt(buf, c.Size()); n != 0 || err == nil {
		t.Errorf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
	if n, err := c.ReadAt(buf, c.Size()-10); n != 10 || err == nil || !bytes.Equal(buf[:10], want[len(want)-10:]) {
		t.Errorf("ReadAt across the end = %d, %v; want 10 bytes and EOF", n, err)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// checkRandomReads reads random ranges, first in one goroutine and then in
// eight at once on the same chain (the cache and the decompressors are
// shared).
func checkRandomReads(t *testing.T, c *qcow.Chain, want []byte) {
	t.Helper()
	size := int64(len(want))
	readSome := func(seed uint64, n int) error {
		r := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 300<<10)
		for range n {
			off := r.Int64N(size)
			length := min(1+r.Int64N(int64(len(buf))), size-off)
			if r.IntN(4) == 0 { // small reads, the common case of a guest
				length = min(1+r.Int64N(4096), size-off)
			}
			p := buf[:length]
			if _, err := c.ReadAt(p, off); err != nil {
				return fmt.Errorf("ReadAt(%d bytes at %d): %v", length, off, err)
			}
			if i := firstDiff(p, want[off:off+length]); i >= 0 {
				return fmt.Errorf("ReadAt(%d bytes at %d) differs from qemu at %d", length, off, off+int64(i))
			}
		}
		return nil
	}
	if err := readSome(1, 100); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() { errs <- readSome(uint64(100+g), 40) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent: %v", err)
		}
	}
}

// sectorKind is how qemu-img map and our Extents classify one 512-byte
// sector: the kind, and for allocated kinds the layer.
type sectorKind struct {
	kind  qcow.ExtentKind
	layer int
}

// checkExtents compares our allocation map with qemu-img map, sector by
// sector (the two merge runs differently): qemu's "data" is our Data, a
// range "present" without data is our Zero (a zero cluster), and what no
// layer has is Unallocated. The layer must be qemu's depth for allocated
// ranges. It also checks that Extents covers the range in order, that a
// sub-range gives the same answer, and that what is not data reads as zeros.
func checkExtents(t *testing.T, c *qcow.Chain, want []byte, path string) {
	t.Helper()
	size := c.Size()
	ext, err := c.Extents(0, size)
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	var pos int64
	for i, e := range ext {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d %+v: want it to start at %d and not be empty", i, e, pos)
		}
		if i > 0 && ext[i-1].Kind == e.Kind && ext[i-1].Layer == e.Layer {
			t.Errorf("extents %d and %d are alike and not merged: %+v %+v", i-1, i, ext[i-1], e)
		}
		if e.Kind != qcow.Data && !allZero(want[e.Offset:e.End()]) {
			t.Errorf("extent %+v reads as non-zero in qemu", e)
		}
		if e.Kind == qcow.Unallocated && e.Layer != c.Depth() {
			t.Errorf("unallocated extent %+v: layer should be the depth %d", e, c.Depth())
		}
		pos = e.End()
	}
	if pos != size {
		t.Fatalf("extents end at %d, the image at %d", pos, size)
	}
	if size%512 != 0 {
		return // a raw image: qemu's map is per sector
	}
	ours := make([]sectorKind, size/512)
	for _, e := range ext {
		for s := e.Offset / 512; s < (e.End()+511)/512; s++ {
			ours[s] = sectorKind{e.Kind, e.Layer}
		}
	}
	qemu := make([]sectorKind, size/512)
	for _, m := range qemutest.Map(t, path) {
		k := sectorKind{kind: qcow.Unallocated, layer: c.Depth()}
		switch {
		case m.Data:
			k = sectorKind{qcow.Data, m.Depth}
		case m.Present:
			k = sectorKind{qcow.Zero, m.Depth}
		}
		for s := m.Start / 512; s < m.End()/512; s++ {
			qemu[s] = k
		}
	}
	for s := range ours {
		if ours[s] != qemu[s] {
			t.Fatalf("sector %d (offset %#x): Extents says %v in layer %d, qemu-img map %v in layer %d",
				s, s*512, ours[s].kind, ours[s].layer, qemu[s].kind, qemu[s].layer)
		}
	}
	// A sub-range is the full map clipped.
	r := rand.New(rand.NewPCG(uint64(size), 2))
	for range 20 {
		off := r.Int64N(size)
		length := 1 + r.Int64N(size-off)
		sub, err := c.Extents(off, length)
		if err != nil {
			t.Fatal(err)
		}
		if want := clip(ext, off, off+length); !slices.Equal(sub, want) {
			t.Fatalf("Extents(%d, %d) = %+v, want the full map clipped: %+v", off, length, sub, want)
		}
	}
}

func clip(ext []qcow.Extent, start, end int64) []qcow.Extent {
	var out []qcow.Extent
	for _, e := range ext {
		s, f := max(e.Offset, start), min(e.End(), end)
		if s < f {
			e.Offset, e.Length = s, f-s
			out = append(out, e)
		}
	}
	return out
}

var zeros = make([]byte, 64<<10)

// allZero reports whether p holds only zeros (by chunks: bytes.Equal is
// much faster than a loop, and the fuzz targets call it on every byte read).
func allZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// checkInfo compares Info with `qemu-img info --backing-chain`.
func checkInfo(t *testing.T, c *qcow.Chain, path string) {
	t.Helper()
	info, err := c.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	chain := qemutest.ImgInfoChain(t, path)
	if len(info.Layers) != len(chain) {
		t.Fatalf("Info has %d layers, qemu-img info %d", len(info.Layers), len(chain))
	}
	if info.VirtualSize != chain[0].VirtualSize {
		t.Errorf("Info.VirtualSize = %d, qemu says %d", info.VirtualSize, chain[0].VirtualSize)
	}
	for i, q := range chain {
		l := info.Layers[i]
		// qemu rounds the size of a raw file up to a whole sector; we read
		// what the file holds (zeros would follow either way).
		if q.Format == "raw" && l.VirtualSize%512 != 0 {
			q.VirtualSize = l.VirtualSize
		}
		if l.Format.String() != q.Format || l.VirtualSize != q.VirtualSize {
			t.Errorf("layer %d: %s %d bytes, qemu says %s %d", i, l.Format, l.VirtualSize, q.Format, q.VirtualSize)
		}
		if q.Format != "qcow2" {
			continue
		}
		d := q.FormatSpecific.Data
		version := map[string]int{"0.10": 2, "1.1": 3}[d.Compat]
		if l.ClusterSize != q.ClusterSize || l.Version != version || l.BackingName != q.BackingFilename || l.DataFile != d.DataFile {
			t.Errorf("layer %d: cluster %d, version %d, backing %q, data file %q; qemu says %d, %s, %q, %q",
				i, l.ClusterSize, l.Version, l.BackingName, l.DataFile, q.ClusterSize, d.Compat, q.BackingFilename, d.DataFile)
		}
		if version == 3 {
			if l.RefcountBits != d.RefcountBits || l.Compression.String() != d.CompressionType {
				t.Errorf("layer %d: %d-bit refcounts, %s; qemu says %d, %s", i, l.RefcountBits, l.Compression, d.RefcountBits, d.CompressionType)
			}
			if slices.Contains(l.Features, "extended_l2") != d.ExtendedL2 || slices.Contains(l.Features, "lazy_refcounts") != d.LazyRefcounts {
				t.Errorf("layer %d: features %v; qemu says extended_l2=%v lazy_refcounts=%v", i, l.Features, d.ExtendedL2, d.LazyRefcounts)
			}
		}
		if slices.Contains(l.Features, "dirty") != q.DirtyFlag {
			t.Errorf("layer %d: features %v; qemu says dirty=%v", i, l.Features, q.DirtyFlag)
		}
		if q.BackingFormat != "" && l.BackingFormat != q.BackingFormat && !strings.Contains(q.BackingFilename, ":") {
			// qemu reports the probed format when the image names none.
			if l.BackingFormat != "" {
				t.Errorf("layer %d: backing format %q, qemu says %q", i, l.BackingFormat, q.BackingFormat)
			}
		}
		if len(l.Snapshots) != len(q.Snapshots) {
			t.Fatalf("layer %d: %d snapshots, qemu lists %d", i, len(l.Snapshots), len(q.Snapshots))
		}
		for j, s := range q.Snapshots {
			got := l.Snapshots[j]
			if got.ID != s.ID || got.Name != s.Name || got.VMStateBytes != s.VMStateSize || got.Created.Unix() != s.DateSec {
				t.Errorf("snapshot %d: %+v; qemu says %+v", j, got, s)
			}
		}
	}
}
