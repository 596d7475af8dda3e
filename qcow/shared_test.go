package qcow

import (
	"bytes"
	"path/filepath"
	"testing"

	"snapfs/internal/qemutest"
)

// TestImmutableFilesShareTheCache: chains opened again on an immutable
// file find its L2 tables in the shared cache (the same layer identity,
// nothing read again), while a file opened by OpenFile gets an identity
// of its own; a file rewritten after all gets a new identity and reads its
// new content.
func TestImmutableFilesShareTheCache(t *testing.T) {
	path := filepath.Join(t.TempDir(), "layer.qcow2")
	qemutest.Create(t, "qcow2", path, "8M")
	qemutest.IO(t, path, "write -P 0x11 1M 1M")
	cache := NewCache(DefaultCacheBytes)

	open := func(openFile func(string) (File, error)) (*Chain, uint64) {
		t.Helper()
		f, err := openFile(path)
		if err != nil {
			t.Fatal(err)
		}
		c, err := Open(f, Options{Cache: cache})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, c.layers[0].(*qcowLayer).id
	}
	read := func(c *Chain) []byte {
		t.Helper()
		buf := make([]byte, 1<<20)
		if _, err := c.ReadAt(buf, 1<<20); err != nil {
			t.Fatal(err)
		}
		return buf
	}

	first, id1 := open(OpenImmutableFile)
	if got := read(first); got[0] != 0x11 {
		t.Fatalf("first open reads %#x", got[0])
	}
	entries := len(cache.entries)
	second, id2 := open(OpenImmutableFile)
	if id2 != id1 {
		t.Errorf("a second open of an immutable file has identity %d, the first %d", id2, id1)
	}
	if got := read(second); got[0] != 0x11 || len(cache.entries) != entries {
		t.Errorf("second open: reads %#x, cache entries %d -> %d (want none added)", got[0], entries, len(cache.entries))
	}
	if _, id := open(OpenFile); id == id1 {
		t.Errorf("OpenFile shares the identity of the immutable opens")
	}

	// Rewritten in place after all: the key changes with it.
	qemutest.IO(t, path, "write -P 0x22 1M 1M")
	third, id3 := open(OpenImmutableFile)
	if id3 == id1 {
		t.Fatalf("a rewritten file keeps its identity")
	}
	if got := read(third); !bytes.Equal(got, bytes.Repeat([]byte{0x22}, 1<<20)) {
		t.Errorf("the rewritten file reads %#x", got[0])
	}
}
