package qcow_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
