package fs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// mounts are the mount points the tests made, to check at the end that none
// is left behind.
var (
	mountsMu sync.Mutex
	mounts   []string
)

func registerMount(dir string) {
	mountsMu.Lock()
	defer mountsMu.Unlock()
	mounts = append(mounts, dir)
}

// TestMain runs the tests and fails the run if any test left a mount
// behind (and then detaches it, so the machine stays clean). With serveEnv
// set, the binary is not a test but a mount server, for the tests that
// kill it (see startServer).
func TestMain(m *testing.M) {
	if os.Getenv(serveEnv) != "" {
		os.Exit(serve())
	}
	code := m.Run()
	mountsMu.Lock()
	for _, dir := range mounts {
		if _, ok := mountedAt(dir); ok {
			fmt.Fprintf(os.Stderr, "FAIL: a test left a mount behind at %s\n", dir)
			exec.Command(fusermount(), "-u", "-z", dir).Run()
			code = 1
		}
	}
	mountsMu.Unlock()
	os.Exit(code)
}

// testLog is a Logger for a mount that writes to the test log while the
// test runs and keeps every line, for tests that check what was logged.
type testLog struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
	buf  bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if !l.done {
		l.t.Logf("mount: %s", bytes.TrimRight(p, "\n"))
	}
	return len(p), nil
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// mounted is a mount of a store in a temporary directory for one test.
type mounted struct {
	dir   string
	srv   *Server
	log   *testLog
	store *snapshot.LocalStore
}

// path returns the path of a file in the mount.
func (m *mounted) path(elem ...string) string {
	return filepath.Join(append([]string{m.dir}, elem...)...)
}

// testMount mounts store in a temp dir, and unmounts it when the test ends.
// configure, if given, changes the Config first.
func testMount(t testing.TB, store *snapshot.LocalStore, configure ...func(*Config)) *mounted {
	t.Helper()
	dir := t.TempDir()
	tl := &testLog{t: t}
	cfg := Config{
		Backend:   store,
		Instances: store,
		UID:       uint32(os.Getuid()),
		GID:       uint32(os.Getgid()),
		Logger:    log.New(tl, "", 0),
		// The test opens files of the mount it serves.
		SelfAccess: true,
	}
	for _, c := range configure {
		c(&cfg)
	}
	srv, err := Mount(dir, cfg)
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	registerMount(dir)
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			srv.LazyUnmount()
		}
		srv.Wait()
		tl.mu.Lock()
		tl.done = true
		tl.mu.Unlock()
	})
	return &mounted{dir: dir, srv: srv, log: tl, store: store}
}

// newStore opens a store in a temp dir.
func newStore(t testing.TB) *snapshot.LocalStore {
	t.Helper()
	s, err := snapshot.OpenLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newVolume creates a volume and writes to its head with qemu-io commands
// ("write -P 1 0 64k").
func newVolume(t testing.TB, store *snapshot.LocalStore, name string, size int64, writes ...string) snapshot.Volume {
	t.Helper()
	v, err := store.CreateVolume(context.Background(), name, size)
	if err != nil {
		t.Fatal(err)
	}
	writeHead(t, store, name, writes...)
	return v
}

// writeHead writes to a volume's head with qemu-io, as a VM would.
func writeHead(t testing.TB, store *snapshot.LocalStore, volume string, writes ...string) {
	t.Helper()
	if len(writes) == 0 {
		return
	}
	v, err := store.Volume(context.Background(), volume)
	if err != nil {
		t.Fatal(err)
	}
	qemutest.IO(t, v.HeadPath, writes...)
}

// snapshotPath returns the layer file of a snapshot, for qemu-img.
func snapshotPath(t testing.TB, store *snapshot.LocalStore, volume, name string) string {
	t.Helper()
	s, err := store.Snapshot(context.Background(), volume, name)
	if err != nil {
		t.Fatal(err)
	}
	return s.Path
}

// sameContent fails the test unless files a and b hold the same bytes. It
// streams, so that large files cost no memory.
func sameContent(t testing.TB, a, b string) {
	t.Helper()
	if err := compareFiles(a, b); err != nil {
		t.Fatal(err)
	}
}

// compareFiles returns an error saying where files a and b first differ.
func compareFiles(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ra, rb := bufio.NewReaderSize(fa, 1<<20), bufio.NewReaderSize(fb, 1<<20)
	bufA, bufB := make([]byte, 1<<20), make([]byte, 1<<20)
	var off int64
	for {
		na, errA := io.ReadFull(ra, bufA)
		nb, errB := io.ReadFull(rb, bufB)
		if na != nb || !bytes.Equal(bufA[:na], bufB[:nb]) {
			for i := 0; i < min(na, nb); i++ {
				if bufA[i] != bufB[i] {
					return fmt.Errorf("%s and %s differ at byte %d", a, b, off+int64(i))
				}
			}
			return fmt.Errorf("%s and %s differ in size (%d and %d bytes read at %d)", a, b, na, nb, off)
		}
		off += int64(na)
		if errA != nil || errB != nil {
			if (errA == io.EOF || errA == io.ErrUnexpectedEOF) && (errB == io.EOF || errB == io.ErrUnexpectedEOF) {
				return nil
			}
			return fmt.Errorf("reading %s, %s: %v, %v", a, b, errA, errB)
		}
	}
}

// checkExports compares disk.raw of a volume snapshot with qemu-img's
// flattening of its chain, and checks disk.qcow2 with qemu-img check and
// compare.
func checkExports(t testing.TB, m *mounted, volume, snap string) {
	t.Helper()
	ref := qemutest.ConvertRawFile(t, snapshotPath(t, m.store, volume, snap))
	dir := m.path("volumes", volume, "snapshots", snap)
	sameContent(t, filepath.Join(dir, "disk.raw"), ref)
	qemutest.Check(t, filepath.Join(dir, "disk.qcow2"))
	qemutest.Compare(t, filepath.Join(dir, "disk.qcow2"), ref)
}

// mustFail fails the test unless err is a *PathError with errno want.
func mustFail(t testing.TB, what string, err error, want error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s succeeded; want %v", what, want)
	}
	if !errors.Is(err, want) {
		t.Fatalf("%s: %v; want %v", what, err, want)
	}
}

// lines returns the lines of s that contain substr.
func lines(s, substr string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// timeZero is a time for utimes calls that must fail.
var timeZero = time.Unix(0, 0)

// diskT is a disk of an instance.
type diskT = snapshot.Disk

// snapshotOptions are the options of snapshots the tests take directly.
func snapshotOptions() snapshot.SnapshotOptions { return snapshot.SnapshotOptions{} }

// TestMountPollHack: Mount opens a file of its own mount (go-fuse's poll
// hack) only with Config.SelfAccess. snapfs mount never reads its own
// files, and a SIGKILL landing inside the hack hangs the mount point for
// good (the killed thread waits for an answer only its own process could
// give).
func TestMountPollHack(t *testing.T) {
	store := newStore(t)
	for _, self := range []bool{true, false} {
		var requests bytes.Buffer
		m := testMount(t, store, func(c *Config) {
			c.SelfAccess = self
			c.Debug = true
			c.Logger = log.New(&syncWriter{w: &requests}, "", 0)
		})
		// Another process reads the mount: it serves.
		if out, err := exec.Command("ls", m.path("volumes")).CombinedOutput(); err != nil {
			t.Fatalf("ls of the mount, SelfAccess %v: %v: %s", self, err, out)
		}
		m.srv.Unmount()
		m.srv.Wait()
		if got := strings.Contains(requests.String(), ".go-fuse-epoll-hack"); got != self {
			t.Errorf("SelfAccess %v: the mount looked up its poll hack file: %v", self, got)
		}
	}
}

// syncWriter serialises the writes of the FUSE server's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
