package qcow

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"snapfs/internal/qemutest"
)

// TestLookupMapMatchesScan checks the parsed L2 tables that lookups use
// against a walk over the raw entries (lookupScan, what extended L2 tables
// still use): for every cluster, and for runs from random offsets of
// random lengths, both must give the same run, or both refuse it. The
// image, made by qemu-io, holds every kind of entry, with data runs that
// are host-contiguous and runs that are not, and is then corrupted in a
// few entries as a hostile image would be.
func TestLookupMapMatchesScan(t *testing.T) {
	path := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "t.qcow2"), "64M")
	qemutest.IO(t, path,
		"write -P 1 0 1M",          // data, contiguous
		"write -P 2 3M 64k",        // data, allocated after what follows in the guest
		"write -P 3 2M 512k",       // data, host-contiguous with the previous write
		"write -z 1M 256k",         // zero clusters (unallocated before)
		"write -c -P 4 5M 128k",    // compressed clusters, one run each
		"write -P 5 8M 4M",         // data
		"write -z 9M 1M",           // zero clusters over allocated data
		"discard 10M 64k",          // a hole in the middle of data
		"write -P 6 33M 64k",       // a cluster in the last L2 entries
		"write -P 7 63M 1M",        // the end of the image
		"write -c -P 8 62M 64k",    // compressed near the end
		"write -P 9 20M 64k",       // isolated data clusters
		"write -P 10 21102592 64k", // ... not contiguous with each other (20M+128k)
		"write -P 11 24M 64k",      // guest-adjacent clusters with a gap on the host:
		"write -P 12 30M 64k",      // ...
		"write -P 13 25231360 64k", // 24M+64k
		"write -P 14 27328512 64k", // and in reverse host order: 26M+64k,
		"write -P 15 26M 64k",      // then 26M
	)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The image has one L2 table (64 KiB clusters: 512 MiB each).
	be := binary.BigEndian
	l1 := int64(be.Uint64(data[40:]))
	table := int64(be.Uint64(data[l1:]) & 0x00fffffffffffe00)
	// Corrupt entries: a data cluster at an unaligned host offset, in the
	// middle of a data run, and one alone in a hole.
	be.PutUint64(data[table+8*int64(8<<20>>16+3):], 1<<63|0x50200)
	be.PutUint64(data[table+8*int64(40<<20>>16):], 0x70200)

	f := BytesFile("t.qcow2", data)
	l, err := openQcow2(f, NewCache(DefaultCacheBytes), DefaultDecompressor)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := l.l2Table(table)
	if err != nil {
		t.Fatal(err)
	}
	cs := l.h.clusterSize()
	size := l.size()
	check := func(off, maxLen int64) {
		t.Helper()
		maxLen = min(maxLen, size-off)
		scan, scanErr := l.lookupScan(raw, off, maxLen, 0)
		got, err := l.lookup(off, maxLen)
		switch {
		case scanErr == nil && err != nil:
			t.Fatalf("lookup(%#x, %#x): %v; the scan gives %+v", off, maxLen, err, scan)
		case scanErr == nil && got != scan:
			t.Fatalf("lookup(%#x, %#x) = %+v; the scan gives %+v", off, maxLen, got, scan)
		case scanErr != nil:
			// The scan refuses the whole range when any entry in it is
			// corrupt; the map stops at that entry and refuses it on
			// the next lookup.
			if !errors.Is(scanErr, ErrCorrupt) {
				t.Fatalf("scan(%#x, %#x): %v, want ErrCorrupt", off, maxLen, scanErr)
			}
			for pos := off; err == nil; pos += got.length {
				if pos >= off+maxLen {
					t.Fatalf("lookups over [%#x, %#x) found no corrupt entry; the scan says %v", off, off+maxLen, scanErr)
				}
				got, err = l.lookup(pos, off+maxLen-pos)
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("lookup in [%#x, %#x): %v, want ErrCorrupt", off, off+maxLen, err)
			}
		}
	}
	for off := int64(0); off < size; off += cs {
		check(off, cs)
		check(off+cs/2, cs/4)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 5000 {
		off := rng.Int64N(size)
		if rng.IntN(2) == 0 {
			off &^= cs - 1
		}
		check(off, 1+rng.Int64N(16<<20))
	}
}
