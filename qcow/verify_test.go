package qcow_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// TestVerifyRefcountWidths: images of every refcount width verify clean.
func TestVerifyRefcountWidths(t *testing.T) {
	dir := t.TempDir()
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, fmt.Sprintf("r%d.qcow2", bits)), "4M", "-o", fmt.Sprintf("refcount_bits=%d,cluster_size=4k", bits))
		qemutest.IO(t, img, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k")
		if err := openChain(t, img).Verify(context.Background()); err != nil {
			t.Errorf("refcount_bits=%d: %v", bits, err)
		}
	}
}

// TestVerifyRefusesUncounted: a data cluster the refcounts do not count
// (here: the L2 entry moved to a cluster past every counted one) is corrupt.
func TestVerifyRefusesUncounted(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "4M", "-o", "cluster_size=4k")
	qemutest.IO(t, img, "write -P 1 0 4k")
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// The first L2 entry lives in the first L2 table, named by the L1 table.
	be := binary.BigEndian
	l1 := be.Uint64(data[40:])
	l2 := be.Uint64(data[l1:]) & 0x00fffffffffffe00
	entry := be.Uint64(data[l2:])
	// Append a cluster the refcounts know nothing about and point there.
	data = append(data, make([]byte, 4096)...)
	be.PutUint64(data[l2:], entry&^0x00fffffffffffe00|uint64(len(data)-4096))
	bad := filepath.Join(dir, "bad.qcow2")
	if err := os.WriteFile(bad, data, 0o600); err != nil {
		t.Fatal(err)
	}
	err = openChain(t, bad).Verify(context.Background())
	if !errors.Is(err, qcow.ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
}

// TestVerifyRefusesSharedClusters: a cluster with two jobs in the active
// tables is corrupt, whatever the refcounts say. QEMU never writes one; a
// hostile image uses one to make Verify walk one L2 table per L1 entry, or
// to make a file of kilobytes read as gigabytes of data.
func TestVerifyRefusesSharedClusters(t *testing.T) {
	dir := t.TempDir()
	// 4 KiB clusters: an L2 table maps 2 MiB, so 4 MiB takes two.
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "4M", "-o", "cluster_size=4k")
	qemutest.IO(t, img, "write -P 1 0 8k", "write -P 2 2M 4k")
	comp := qemutest.Create(t, "qcow2", filepath.Join(dir, "comp.qcow2"), "4M", "-o", "cluster_size=4k")
	qemutest.IO(t, comp, "write -c -P 3 0 4k", "write -c -P 4 4k 4k")
	if err := openChain(t, img).Verify(context.Background()); err != nil {
		t.Fatalf("the image as qemu wrote it: %v", err)
	}
	be := binary.BigEndian
	const offsetMask = 0x00fffffffffffe00
	for _, c := range []struct {
		name string
		from string
		poke func(data []byte)
		says string
	}{
		{"L2 table named twice", img, func(data []byte) {
			l1 := be.Uint64(data[40:])
			be.PutUint64(data[l1+8:], be.Uint64(data[l1:]))
		}, "L2 table 1"},
		{"data cluster named twice", img, func(data []byte) {
			l2 := be.Uint64(data[be.Uint64(data[40:]):]) & offsetMask
			be.PutUint64(data[l2+8:], be.Uint64(data[l2:]))
		}, "data cluster"},
		{"data in the L1 table", img, func(data []byte) {
			l1 := be.Uint64(data[40:])
			l2 := be.Uint64(data[l1:]) & offsetMask
			e := be.Uint64(data[l2:])
			be.PutUint64(data[l2:], e&^offsetMask|l1)
		}, "data cluster"},
		{"compressed data named twice", comp, func(data []byte) {
			l2 := be.Uint64(data[be.Uint64(data[40:]):]) & offsetMask
			be.PutUint64(data[l2+8:], be.Uint64(data[l2:]))
		}, "twice"},
	} {
		verifyRefuses(t, c.name, poked(t, c.from, dir, c.poke), c.says)
	}
}

// poked writes a copy of the image at from, changed by poke, into dir, and
// returns its path.
func poked(t *testing.T, from, dir string, poke func(data []byte)) string {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	poke(data)
	bad := filepath.Join(dir, "bad.qcow2")
	if err := os.WriteFile(bad, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return bad
}

// verifyRefuses checks that Verify refuses the image at path as corrupt,
// with a message that says what.
func verifyRefuses(t *testing.T, name, path, says string) {
	t.Helper()
	err := openChain(t, path).Verify(context.Background())
	if !errors.Is(err, qcow.ErrCorrupt) || !strings.Contains(err.Error(), says) {
		t.Errorf("%s: got %v, want ErrCorrupt naming %q", name, err, says)
	}
}

// TestVerifyRefusesEntriesQemuDoesNotRead: L2 entries that qemu-img check
// reports, or that qemu fails to read, are corrupt: the store keeps a file
// that Verify passed as a layer, which qemu and VMs then read.
func TestVerifyRefusesEntriesQemuDoesNotRead(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "4M", "-o", "cluster_size=4k")
	qemutest.IO(t, img, "write -P 1 0 4k", "write -z 4k 4k", "write -c -P 2 8k 4k")
	if err := openChain(t, img).Verify(context.Background()); err != nil {
		t.Fatalf("the image as qemu wrote it: %v", err)
	}
	be := binary.BigEndian
	l2 := func(data []byte) uint64 { return be.Uint64(data[be.Uint64(data[40:]):]) & 0x00fffffffffffe00 }
	flip := func(off uint64, data []byte, bit uint64) { be.PutUint64(data[off:], be.Uint64(data[off:])^bit) }
	for _, c := range []struct {
		name string
		poke func(data []byte)
		says string
	}{
		{"zero cluster in a version 2 image", func(data []byte) { be.PutUint32(data[4:], 2) }, "version 2"},
		{"L2 entry with reserved bit 60", func(data []byte) { be.PutUint64(data[l2(data):], be.Uint64(data[l2(data):])|1<<60) }, "L2 entry 0"},
		{"L2 entry with reserved bit 1", func(data []byte) { be.PutUint64(data[l2(data):], be.Uint64(data[l2(data):])|1<<1) }, "L2 entry 0"},
		{"L1 entry with reserved bit 8", func(data []byte) {
			l1 := be.Uint64(data[40:])
			be.PutUint64(data[l1:], be.Uint64(data[l1:])|1<<8)
		}, "L1 entry 0"},
		// 4 MiB of 4 KiB clusters: two L1 entries, the second unused.
		{"L1 entry with the COPIED flag and no table", func(data []byte) { flip(be.Uint64(data[40:])+8, data, 1<<63) }, "L1 entry 1"},
		{"L2 table counted once without the COPIED flag", func(data []byte) { flip(be.Uint64(data[40:]), data, 1<<63) }, "L2 table 0"},
		{"data cluster counted once without the COPIED flag", func(data []byte) { flip(l2(data), data, 1<<63) }, "COPIED"},
		{"compressed cluster with the COPIED flag", func(data []byte) { flip(l2(data)+16, data, 1<<63) }, "L2 entry 2"},
		// 4 KiB clusters: the sector count is bits 58-61.
		{"compressed cluster running past the end of the file", func(data []byte) {
			be.PutUint64(data[l2(data)+16:], be.Uint64(data[l2(data)+16:])|0xf<<58)
		}, "runs past the end"},
	} {
		bad := poked(t, img, dir, c.poke)
		if out, err := qemutest.Try(t, "qemu-img", "check", bad); err == nil {
			if _, err := qemutest.Try(t, "qemu-img", "convert", "-O", "raw", bad, filepath.Join(dir, "bad.raw")); err == nil {
				t.Fatalf("%s: qemu checks and reads it (%s): not a refusal to test", c.name, out)
			}
		}
		verifyRefuses(t, c.name, bad, c.says)
	}
}
