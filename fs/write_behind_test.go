package fs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"snapfs/internal/directio"
)

// TestWriteBehindOrder: overlapping writes at random offsets, queued or
// written directly when the pool runs dry, leave the file as the same
// writes made one by one would, and every buffer goes back to the pool.
func TestWriteBehindOrder(t *testing.T) {
	const size = 1 << 20
	pool := &chunkPool{size: 64 << 10, max: 3} // smaller than the queue: some writes go direct
	f, err := os.Create(filepath.Join(t.TempDir(), "staged"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil { // the random writes may not reach the end
		t.Fatal(err)
	}
	w := newWriteBehind(f, directio.Buffered(f), pool)
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		n := 1 + rng.IntN(96<<10) // some larger than a buffer
		off := rng.Int64N(size - int64(n))
		p := bytes.Repeat([]byte{byte(i)}, n)
		if got, err := w.WriteAt(p, off); err != nil || got != n {
			t.Fatalf("write %d: %d, %v", i, got, err)
		}
		copy(want[off:], p)
		clear(p) // the caller's buffer is go-fuse's: reused at once
		if i%500 == 0 {
			if err := w.drain(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.stop(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("the file differs from the writes applied in order")
	}
	if n := pool.used(); n != 0 {
		t.Errorf("%d buffers not back in the pool", n)
	}
}

// TestWriteBehindFailure: a write that fails in the background is the
// error of the next write, of drain and of stop, and nothing after it is
// written.
func TestWriteBehindFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "staged")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path) // read-only: every write fails, with EBADF
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pool := &chunkPool{size: 4096, max: 4}
	w := newWriteBehind(f, directio.Buffered(f), pool)
	if n, err := w.WriteAt([]byte("queued"), 0); err != nil || n != 6 {
		t.Fatalf("the first write is queued: %d, %v", n, err)
	}
	if err := w.drain(); !errors.Is(err, syscall.EBADF) {
		t.Errorf("drain: %v, want EBADF", err)
	}
	if n, err := w.WriteAt([]byte("after"), 6); !errors.Is(err, syscall.EBADF) || n != 0 {
		t.Errorf("the write after the failure: %d, %v", n, err)
	}
	if err := w.stop(); !errors.Is(err, syscall.EBADF) {
		t.Errorf("stop: %v, want EBADF", err)
	}
	if n := pool.used(); n != 0 {
		t.Errorf("%d buffers not back in the pool", n)
	}
}

// TestImportFullDisk: with the staging directory on a full filesystem
// (an 8 MiB tmpfs), cp of a larger image into import/ fails with ENOSPC,
// although its writes are answered before they reach the disk; nothing
// is imported or left, and the next import that fits works.
func TestImportFullDisk(t *testing.T) {
	staging := t.TempDir()
	if err := syscall.Mount("tmpfs", staging, "tmpfs", 0, "size=8m,mode=0700"); err != nil {
		t.Fatalf("mounting a small tmpfs (the tests run as root): %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(staging, 0); err != nil {
			t.Errorf("unmounting the tmpfs: %v", err)
		}
	})
	m := testMount(t, newStore(t), stagingIn(staging))
	big := filepath.Join(t.TempDir(), "big.raw")
	data := make([]byte, 24<<20)
	rand.NewChaCha8([32]byte{3}).Read(data)
	if err := os.WriteFile(big, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("cp", big, m.path("import", "full")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No space left on device") {
		t.Errorf("cp onto a full staging directory: %v: %s", err, out)
	}
	if _, err := os.Stat(m.path("volumes", "full")); !os.IsNotExist(err) {
		t.Errorf("volumes/full after a failed import: %v", err)
	}
	if logged := lines(m.log.String(), "import full failed"); len(logged) != 1 {
		t.Errorf("log: %q", logged)
	}
	noLeftovers(t, m, staging)

	small := filepath.Join(t.TempDir(), "small.raw")
	if err := os.WriteFile(small, data[:2<<20], 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", small, m.path("import", "fits")).CombinedOutput(); err != nil {
		t.Fatalf("cp of what fits after the failure: %v: %s", err, out)
	}
	sameContent(t, m.path("volumes", "fits", "head.raw"), small)
	noLeftovers(t, m, staging, "fits")
}
