package qcow_test

// Fuzz targets for everything the reader parses: the header and its
// extensions, the L1 and L2 tables (standard and extended entries,
// compressed cluster descriptors), the refcount table and blocks (through
// Chain.Verify), and compressed clusters. They are seeded with the real
// images in testdata/seeds (made by testdata/make-seeds.sh); `go test` runs
// the seeds, `go test -fuzz FuzzX` explores.
//
// Every input is opened as untrusted. The properties: no panic; every
// error wraps one of the package's sentinels; what Extents says is not data
// reads as zeros.

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// seedImage is one image of testdata/seeds.
type seedImage struct {
	name string
	data []byte
}

func seedImages(t testing.TB) []seedImage {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join("testdata", "seeds", "*.qcow2"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no seed images in testdata/seeds (%v): run testdata/make-seeds.sh", err)
	}
	var seeds []seedImage
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, seedImage{filepath.Base(p), data})
	}
	return seeds
}

// sentinels are the errors every refusal must wrap.
var sentinels = []error{qcow.ErrCorrupt, qcow.ErrUnsupported, qcow.ErrEncrypted, qcow.ErrLimit,
	qcow.ErrBacking, qcow.ErrChain, qcow.ErrDataFile}

func typed(err error) bool {
	return slices.ContainsFunc(sentinels, func(s error) bool { return errors.Is(err, s) })
}

// maxFuzzRead bounds the virtual size of the images a fuzz target reads
// whole: a header can claim 2^62 bytes, which reads as zeros forever, and
// every exec that reads 64 MiB of zeros is one the fuzzer does not make.
const maxFuzzRead = 8 << 20

// fuzzImage opens data as an untrusted qcow2 image and exercises every way
// of reading it. It fails on untyped errors and on inconsistencies; typed
// refusals are the expected outcome of most inputs.
func fuzzImage(t *testing.T, data []byte) {
	qcow2 := qcow.FormatQcow2
	c, err := qcow.Open(qcow.BytesFile("fuzz.qcow2", data), qcow.Options{
		Untrusted: true,
		Format:    &qcow2,
		// A small cache, so that eviction runs too; not smaller than a
		// few of the largest tables (2 MiB), or every lookup re-reads
		// its table and the fuzzer measures that instead.
		Cache: qcow.NewCache(8 << 20),
	})
	if err != nil {
		if !typed(err) {
			t.Fatalf("Open: untyped error: %v", err)
		}
		return
	}
	defer c.Close()
	check := func(what string, err error) bool {
		if err != nil && !typed(err) {
			t.Fatalf("%s: untyped error: %v", what, err)
		}
		return err == nil
	}
	if c.Size() < 0 {
		t.Fatalf("negative size %d", c.Size())
	}
	check("Info", func() error { _, err := c.Info(); return err }())
	check("Verify", c.Verify(context.Background()))
	ext, err := c.Extents(0, c.Size())
	if !check("Extents", err) || c.Size() > maxFuzzRead {
		return
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(buf)) {
		n, err := c.ReadAt(buf, off)
		if err != nil && err != io.EOF && !check("ReadAt", err) {
			return
		}
		// What the map says is not data must read as zeros.
		for _, e := range clip(ext, off, off+int64(n)) {
			if e.Kind != qcow.Data && !allZero(buf[e.Offset-off:e.End()-off]) {
				t.Fatalf("extent %+v reads as non-zero", e)
			}
		}
	}
}

// FuzzOpen mutates whole images. Seeds of more than 16 KiB (extended L2
// needs 16 KiB clusters) are left to the structured targets: byte
// mutations spread over 100 KiB of zeros find little and minimise slowly.
func FuzzOpen(f *testing.F) {
	for _, s := range seedImages(f) {
		if len(s.data) <= 16<<10 {
			f.Add(s.data)
		}
	}
	f.Fuzz(fuzzImage)
}

// headerArea is how much of the start of a seed FuzzHeader replaces: the
// header, its extensions and the backing file name all live there.
const headerArea = 1024

// FuzzHeader mutates the header area of a seed image and keeps its tables:
// the fuzzer spends its time on header fields and extensions.
func FuzzHeader(f *testing.F) {
	seeds := seedImages(f)
	for i, s := range seeds {
		f.Add(uint8(i), s.data[:headerArea])
	}
	f.Fuzz(func(t *testing.T, which uint8, header []byte) {
		img := slices.Clone(seeds[int(which)%len(seeds)].data)
		copy(img[:headerArea], header)
		fuzzImage(t, img)
	})
}

// layout is what fuzz targets need to know of a seed image to patch its
// tables; it is read from the header without the package under test.
type layout struct {
	clusterBits int
	extendedL2  bool
	l1, l1Size  int64
	l2          []int64 // offsets of the L2 tables in use
	refTable    int64
	refBlock    int64 // the first refcount block
}

func parseLayout(b []byte) layout {
	l := layout{
		clusterBits: int(be.Uint32(b[hdrClusterBits:])),
		l1:          int64(be.Uint64(b[hdrL1Offset:])),
		l1Size:      int64(be.Uint32(b[hdrL1Size:])),
		refTable:    int64(be.Uint64(b[hdrRefTableOffset:])),
	}
	if be.Uint32(b[hdrVersion:]) == 3 {
		l.extendedL2 = b[hdrIncompatible+7]&(1<<4) != 0
	}
	for i := range l.l1Size {
		if off := int64(be.Uint64(b[l.l1+8*i:]) & 0x00fffffffffffe00); off != 0 {
			l.l2 = append(l.l2, off)
		}
	}
	l.refBlock = int64(be.Uint64(b[l.refTable:]))
	return l
}

func (l layout) l2EntryBytes() int64 {
	if l.extendedL2 {
		return 16
	}
	return 8
}

// FuzzL2 rewrites one L1 entry and one L2 entry (with its subcluster
// bitmap when the image has extended L2 entries) of a seed image: standard,
// zero, compressed, unaligned, past the end of the file, and whatever the
// fuzzer finds.
func FuzzL2(f *testing.F) {
	seeds := seedImages(f)
	for i, s := range seeds {
		l := parseLayout(s.data)
		// The real entries of every L2 table in use, each as a seed.
		for _, table := range l.l2 {
			for j := int64(0); j < 1<<l.clusterBits/l.l2EntryBytes(); j++ {
				at := table + j*l.l2EntryBytes()
				entry := be.Uint64(s.data[at:])
				var bitmap uint64
				if l.extendedL2 {
					bitmap = be.Uint64(s.data[at+8:])
				}
				if entry != 0 || bitmap != 0 {
					f.Add(uint8(i), uint8(0), uint64(0), uint16(j), entry, bitmap)
				}
			}
		}
	}
	f.Add(uint8(0), uint8(0), uint64(1<<63|0x200), uint16(0), uint64(0), uint64(0))       // L2 table at an unaligned offset
	f.Add(uint8(0), uint8(1), uint64(1<<63|1<<40), uint16(0), uint64(0), uint64(0))       // L2 table past the end
	f.Add(uint8(0), uint8(0), uint64(0), uint16(3), uint64(1<<62|0xffff_ffff), uint64(0)) // compressed, past the end
	f.Add(uint8(0), uint8(0), uint64(0), uint16(3), uint64(1<<63|0x400|1), uint64(0))     // preallocated zero cluster
	f.Fuzz(func(t *testing.T, which, l1Index uint8, l1Entry uint64, l2Index uint16, entry, bitmap uint64) {
		img := slices.Clone(seeds[int(which)%len(seeds)].data)
		l := parseLayout(img)
		if l1Entry != 0 && l.l1Size > 0 {
			poke64(img, l.l1+8*(int64(l1Index)%l.l1Size), l1Entry)
		}
		if len(l.l2) > 0 {
			table := l.l2[int(l2Index)%len(l.l2)]
			at := table + int64(l2Index)%(1<<l.clusterBits/l.l2EntryBytes())*l.l2EntryBytes()
			if at+l.l2EntryBytes() <= int64(len(img)) {
				poke64(img, at, entry)
				if l.extendedL2 {
					poke64(img, at+8, bitmap)
				}
			}
		}
		fuzzImage(t, img)
	})
}

// FuzzRefcounts rewrites one refcount table entry and 8 bytes of the first
// refcount block of a seed image (of every refcount width): Chain.Verify
// parses them.
func FuzzRefcounts(f *testing.F) {
	seeds := seedImages(f)
	for i, s := range seeds {
		l := parseLayout(s.data)
		f.Add(uint8(i), uint8(0), uint64(l.refBlock), uint16(0), be.Uint64(s.data[l.refBlock:]))
		f.Add(uint8(i), uint8(1), uint64(l.refBlock), uint16(1), uint64(0))
	}
	f.Add(uint8(0), uint8(0), uint64(0x201), uint16(0), uint64(0))  // unaligned, reserved bits
	f.Add(uint8(0), uint8(0), uint64(1<<50), uint16(0), uint64(0))  // refcount block past the end
	f.Add(uint8(0), uint8(0), uint64(0), uint16(0), uint64(0))      // no refcount block at all
	f.Add(uint8(0), uint8(0), uint64(0x200), uint16(0), ^uint64(0)) // all ones
	f.Fuzz(func(t *testing.T, which, tableIndex uint8, tableEntry uint64, blockWord uint16, blockValue uint64) {
		img := slices.Clone(seeds[int(which)%len(seeds)].data)
		l := parseLayout(img)
		cs := int64(1) << l.clusterBits
		if at := l.refTable + int64(tableIndex)*8%cs; at+8 <= int64(len(img)) {
			poke64(img, at, tableEntry)
		}
		if at := l.refBlock + int64(blockWord)*8%cs; l.refBlock > 0 && at+8 <= int64(len(img)) {
			poke64(img, at, blockValue)
		}
		fuzzImage(t, img)
	})
}

// FuzzCompressed feeds compressed clusters to the decompressor: the real
// ones of the seed images (zlib and zstd as qemu writes them) and the
// package's own compressor's, for every cluster size.
func FuzzCompressed(f *testing.F) {
	for _, s := range seedImages(f) {
		l := parseLayout(s.data)
		comp := qcow.CompressionZlib
		if be.Uint32(s.data[hdrVersion:]) == 3 && be.Uint32(s.data[hdrHeaderLength:]) > 104 {
			comp = qcow.Compression(s.data[hdrCompressionType])
		}
		for _, table := range l.l2 {
			for j := int64(0); j < 1<<l.clusterBits/l.l2EntryBytes(); j++ {
				entry := be.Uint64(s.data[table+j*l.l2EntryBytes():])
				if entry&(1<<62) == 0 {
					continue
				}
				shift := 62 - (l.clusterBits - 8)
				off := int64(entry & (1<<shift - 1))
				size := int64((entry>>shift)&(1<<(l.clusterBits-8)-1)+1)*512 - off&511
				f.Add(uint8(comp), uint8(l.clusterBits), s.data[off:min(off+size, int64(len(s.data)))])
			}
		}
	}
	text := []byte("a cluster of text, a cluster of text, compressed by the package itself. ")
	for bits := uint8(9); bits <= 21; bits += 4 {
		src := make([]byte, 1<<bits)
		for i := 0; i < len(src); i += len(text) {
			copy(src[i:], text)
		}
		for _, c := range []qcow.Compression{qcow.CompressionZlib, qcow.CompressionZstd} {
			out, _, err := qcow.DefaultCompressor(c, make([]byte, 0, len(src)), src, len(src))
			if err != nil {
				f.Fatal(err)
			}
			f.Add(uint8(c), bits, slices.Clone(out))
		}
	}
	f.Fuzz(func(t *testing.T, comp, clusterBits uint8, src []byte) {
		dst := make([]byte, 1<<(9+int(clusterBits)%13)) // 512 B to 2 MiB, as qcow2 allows
		err := qcow.DefaultDecompressor(qcow.Compression(comp%3), dst, src)
		if err != nil && !typed(err) {
			t.Fatalf("untyped error: %v", err)
		}
	})
}

// TestSeedsMatchQemu reads the seed images against qemu: they must stay
// valid images of the features they are named after, or the fuzz targets
// start from nothing.
func TestSeedsMatchQemu(t *testing.T) {
	for _, s := range seedImages(t) {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join("testdata", "seeds", s.name)
			c, err := qcow.Open(qcow.BytesFile(s.name, s.data), qcow.Options{Untrusted: true})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			want := qemutest.ConvertRaw(t, path)
			checkBytes(t, c, want)
			checkExtents(t, c, want, path)
			fuzzImage(t, s.data)
		})
	}
}
