package fs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"snapfs/internal/qemutest"
)

// TestReadersDuringSnapshots: readers read exports while snapshots are
// taken and deleted around them, including the deletion of a snapshot below
// the one they read (its data moves into the layer they read through), and
// every byte they read equals the reference. Readers use O_DIRECT, so that
// every read reaches the filesystem instead of the kernel's cache.
func TestReadersDuringSnapshots(t *testing.T) {
	const size = 16 << 20
	store := newStore(t)
	newVolume(t, store, "v", size, "write -P 0x01 0 16M")
	m := testMount(t, store)
	snaps := m.path("volumes", "v", "snapshots")
	mkdir := func(name string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(snaps, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mkdir("base")
	writeHead(t, store, "v", "write -P 0x02 1M 2M", "write -z 4M 1M")
	mkdir("x0")
	writeHead(t, store, "v", "write -P 0x03 2M 2M", "write -P 0x04 10M 64k")
	mkdir("fixed")

	refs := map[string][]byte{}
	for _, s := range []string{"base", "fixed"} {
		refs[s] = qemutest.ConvertRaw(t, snapshotPath(t, store, "v", s))
	}
	qcowRef := filepath.Join(t.TempDir(), "fixed.qcow2")
	copyFile(t, filepath.Join(snaps, "fixed", "disk.qcow2"), qcowRef)
	refs["fixed.qcow2"], _ = os.ReadFile(qcowRef)

	stop := make(chan struct{})
	var reads atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	reader := func(snap, file string, ref []byte) {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := readDirect(filepath.Join(snaps, snap, file), len(ref))
			if err != nil {
				errs <- fmt.Errorf("reading %s/%s: %w", snap, file, err)
				return
			}
			if !bytes.Equal(got, ref) {
				errs <- fmt.Errorf("%s/%s read differs from the reference at byte %d", snap, file, firstDiff(got, ref))
				return
			}
			reads.Add(1)
		}
	}
	for range 2 {
		wg.Add(3)
		go reader("base", "disk.raw", refs["base"])
		go reader("fixed", "disk.raw", refs["fixed"])
		go reader("fixed", "disk.qcow2", refs["fixed.qcow2"])
	}

	// Delete x0 (below "fixed": its data moves into fixed's layer), then
	// take and delete snapshots above.
	rmdir := func(name string) {
		t.Helper()
		if err := os.Remove(filepath.Join(snaps, name)); err != nil {
			t.Fatalf("rmdir %s: %v", name, err)
		}
	}
	rmdir("x0")
	const rounds = 15
	for i := 1; i <= rounds; i++ {
		writeHead(t, store, "v", fmt.Sprintf("write -P 0x%02x %dM 1M", 0x10+i, i%16))
		mkdir(fmt.Sprintf("x%d", i))
		if i > 1 {
			rmdir(fmt.Sprintf("x%d", i-1))
		}
	}
	// Readers may be slower than the loop: give each a few rounds.
	for deadline := time.Now().Add(30 * time.Second); reads.Load() < 12 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d whole-file reads during %d snapshot creates and deletes", reads.Load(), 2*rounds)
	checkExports(t, m, "v", "base")
	checkExports(t, m, "v", "fixed")
	checkExports(t, m, "v", fmt.Sprintf("x%d", rounds))
}

// readDirect reads a whole file with O_DIRECT, bypassing the page cache.
func readDirect(path string, size int) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, size)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	if extra, _ := f.Read(make([]byte, 1)); extra != 0 {
		return nil, fmt.Errorf("longer than %d bytes", size)
	}
	return buf[:n], nil
}

// firstDiff returns the first offset where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
