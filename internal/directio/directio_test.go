package directio

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// mapped returns n bytes of mapped memory, page-aligned as direct writes
// want their buffers, filled with a pattern.
func mapped(t *testing.T, n int, seed byte) []byte {
	t.Helper()
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Munmap(b) })
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

// TestWriteAt: whole pages at an aligned offset go direct, a tail and
// unaligned writes through the page cache, and a write the filesystem
// refuses direct (a buffer that is not aligned: EINVAL) goes through the
// page cache too, as every later one. The file reads as the writes made
// one by one would leave it.
func TestWriteAt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f") // the test machine's disk: ext4, which takes O_DIRECT
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := NewWriter(f)
	defer w.Close()
	if w.direct == nil {
		t.Fatalf("no direct descriptor for %s: the test needs a filesystem with O_DIRECT", path)
	}
	want := make([]byte, 64<<10)
	write := func(p []byte, off int64) {
		t.Helper()
		if err := w.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
		}
		copy(want[off:], p)
	}

	write(mapped(t, 3*Align+100, 1), 0)          // 3 pages direct, a tail
	write(mapped(t, 1000, 2)[:1000], 5*Align+17) // unaligned: the page cache
	write(mapped(t, 2*Align, 3), 2*Align)        // direct, over the tail's page
	if w.direct == nil {
		t.Fatal("the direct descriptor was dropped after writes it takes")
	}
	odd := mapped(t, 3*Align, 4)[1 : 2*Align+1] // aligned length, buffer off by one
	write(odd, 8*Align)
	if w.direct != nil {
		t.Error("a write refused direct (EINVAL) left the direct descriptor in use")
	}
	write(mapped(t, Align, 5), 10*Align) // through the page cache from now

	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[:len(got)]) || len(got) != 11*Align {
		t.Errorf("the file (%d bytes) does not read as the writes left it", len(got))
	}
}

// TestBuffered: a Buffered writer never opens a direct descriptor, and its
// failures are the file's (here a read-only descriptor: EBADF).
func TestBuffered(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := Buffered(f)
	if err := w.WriteAt(mapped(t, Align, 6), 0); err == nil {
		t.Error("a write through a read-only descriptor succeeded")
	}
	if err := w.Close(); err != nil {
		t.Error(err)
	}
}
