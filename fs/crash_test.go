package fs

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// serveEnv, when set in the environment of the test binary, makes it a
// mount server instead of running tests (see startServer): the tests that
// kill -9 the server need it in a process of its own.
const serveEnv = "SNAPFS_FS_TEST_SERVE"

// serveConfig is what serveEnv holds, as JSON.
type serveConfig struct {
	Store, Mountpoint, Staging string
}

// serve is main of the server process: mount, say "ready" on stdout, serve
// until unmounted or SIGTERM.
func serve() int {
	var cfg serveConfig
	if err := json.Unmarshal([]byte(os.Getenv(serveEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	store, err := snapshot.OpenLocal(cfg.Store)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer store.Close()
	srv, err := Mount(cfg.Mountpoint, Config{
		Backend: store, Instances: store, StagingDir: cfg.Staging,
		UID: uint32(os.Getuid()), GID: uint32(os.Getgid()),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() {
		<-sigs
		if err := srv.Unmount(); err != nil {
			srv.LazyUnmount()
		}
	}()
	fmt.Println("ready")
	srv.Wait()
	return 0
}

// server is a mount served by a child process.
type server struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr bytes.Buffer
	exited chan struct{}
}

// Write collects the child's stderr.
func (s *server) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.Write(p)
}

func (s *server) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.String()
}

// startServer mounts store on mnt from a child process, stopping at the
// store's pause point pause if it is not empty, and waits until it serves.
func startServer(t *testing.T, cfg serveConfig, pause string) *server {
	t.Helper()
	env, _ := json.Marshal(cfg)
	s := &server{exited: make(chan struct{})}
	s.cmd = exec.Command(os.Args[0], "-test.run=^$")
	s.cmd.Env = append(os.Environ(), serveEnv+"="+string(env), snapshot.PauseEnv+"="+pause)
	s.cmd.Stderr = s
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	registerMount(cfg.Mountpoint)
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("server said %q", line)
		}
		ready <- err
		io.Copy(io.Discard, stdout)
		s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-s.exited
		}
		if _, ok := mountedAt(cfg.Mountpoint); ok {
			exec.Command(fusermount(), "-u", "-z", cfg.Mountpoint).Run()
		}
	})
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("server: %v; stderr: %s", err, s.output())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("server not ready; stderr: %s", s.output())
	}
	return s
}

// waitPaused waits until the server says it stopped at point.
func (s *server) waitPaused(t *testing.T, point string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(s.output(), "paused at "+point) {
		select {
		case <-s.exited:
			t.Fatalf("server exited before pausing at %s; stderr: %s", point, s.output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not pause at %s; stderr: %s", point, s.output())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill kills the server with SIGKILL.
func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

// cleanStale checks that CheckMountpoint reports the mount a killed server
// left as stale, with the fix, and applies the fix.
func cleanStale(t *testing.T, mnt string) {
	t.Helper()
	err := CheckMountpoint(mnt)
	if !errors.Is(err, ErrStaleMount) || !strings.Contains(err.Error(), "-u "+mnt) {
		t.Errorf("CheckMountpoint after kill -9: %v; want ErrStaleMount with the fix", err)
	}
	// The kernel may still be letting go of the requests that were cut
	// short: busy for a moment.
	for try := 0; ; try++ {
		out, err := exec.Command(fusermount(), "-u", mnt).CombinedOutput()
		if err == nil {
			return
		}
		if try == 50 {
			t.Fatalf("fusermount -u of the stale mount: %v: %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// crashWorld is a store with a volume whose snapshots and head have
// references taken before a crash test disturbs it.
type crashWorld struct {
	cfg  serveConfig
	refs map[string]string // path in the mount -> reference file
}

func newCrashWorld(t *testing.T) *crashWorld {
	t.Helper()
	w := &crashWorld{
		cfg:  serveConfig{Store: t.TempDir(), Mountpoint: t.TempDir(), Staging: t.TempDir()},
		refs: map[string]string{},
	}
	store, err := snapshot.OpenLocal(w.cfg.Store)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	ctx := t.Context()
	newVolume(t, store, "v", 32<<20, "write -P 0x01 0 16M")
	for i, snap := range []string{"base", "mid", "top"} {
		if i > 0 {
			writeHead(t, store, "v", fmt.Sprintf("write -P 0x%02x %dM 8M", 0x10+i, 4*i))
		}
		if _, err := store.CreateSnapshots(ctx, []string{"v"}, snap, snapshot.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		w.refs["volumes/v/snapshots/"+snap+"/disk.raw"] = qemutest.ConvertRawFile(t, snapshotPath(t, store, "v", snap))
	}
	writeHead(t, store, "v", "write -P 0x20 20M 4M")
	v, err := store.Volume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	w.refs["volumes/v/head.raw"] = qemutest.ConvertRawFile(t, v.HeadPath)
	return w
}

// check fails the test unless every reference reads the same through
// the mount, and optional, if it exists, reads as ref.
func (w *crashWorld) check(t *testing.T, optional, ref string) {
	t.Helper()
	for rel, file := range w.refs {
		if err := compareFiles(filepath.Join(w.cfg.Mountpoint, rel), file); err != nil {
			t.Errorf("after the crash: %v", err)
		}
	}
	if optional == "" {
		return
	}
	path := filepath.Join(w.cfg.Mountpoint, optional)
	if _, err := os.Stat(path); err == nil {
		if err := compareFiles(path, ref); err != nil {
			t.Errorf("after the crash: %v", err)
		}
		t.Logf("%s survived the crash and reads right", optional)
	} else if !os.IsNotExist(err) {
		t.Errorf("after the crash: %v", err)
	} else {
		t.Logf("%s is gone after the crash", optional)
	}
}

// crash runs op against a server paused at point, kills it there, restarts
// it, and checks that everything reads as before.
func crash(t *testing.T, w *crashWorld, point string, op func(mnt string) error, optional, ref string) {
	t.Helper()
	s := startServer(t, w.cfg, point)
	done := make(chan error, 1)
	go func() { done <- op(w.cfg.Mountpoint) }()
	s.waitPaused(t, point)
	s.kill()
	if err := <-done; err == nil {
		t.Errorf("the operation cut short by kill -9 reported success")
	}
	cleanStale(t, w.cfg.Mountpoint)
	startServer(t, w.cfg, "")
	w.check(t, optional, ref)
	if left, _ := os.ReadDir(w.cfg.Staging); len(left) > 0 {
		t.Errorf("staging files left after restart: %v", left)
	}
	layers, _ := os.ReadDir(filepath.Join(w.cfg.Store, "layers"))
	for _, e := range layers {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temp file left in the store after restart: %s", e.Name())
		}
	}
}

func TestCrashSnapshotCreate(t *testing.T) {
	for _, point := range []string{snapshot.PauseSnapshotWritten, snapshot.PauseSnapshotCommitted} {
		t.Run(point, func(t *testing.T) {
			w := newCrashWorld(t)
			mkdir := func(mnt string) error { return os.Mkdir(filepath.Join(mnt, "volumes/v/snapshots/new"), 0o755) }
			crash(t, w, point, mkdir, "volumes/v/snapshots/new/disk.raw", w.refs["volumes/v/head.raw"])
		})
	}
}

func TestCrashSnapshotDelete(t *testing.T) {
	for _, point := range []string{
		snapshot.PauseDeleteMerging, snapshot.PauseDeleteMerged,
		snapshot.PauseDeleteRenamed, snapshot.PauseDeleteCommitted,
	} {
		t.Run(point, func(t *testing.T) {
			w := newCrashWorld(t)
			mid := "volumes/v/snapshots/mid/disk.raw"
			ref := w.refs[mid]
			delete(w.refs, mid)
			rmdir := func(mnt string) error { return os.Remove(filepath.Join(mnt, "volumes/v/snapshots/mid")) }
			crash(t, w, point, rmdir, mid, ref)
			// And the delete goes through now.
			if err := rmdir(w.cfg.Mountpoint); err != nil && !os.IsNotExist(err) {
				t.Errorf("rmdir after restart: %v", err)
			}
			w.check(t, "", "")
		})
	}
}

func TestCrashImport(t *testing.T) {
	src := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "src.qcow2"), "64M")
	qemutest.IO(t, src, "write -P 0x51 0 48M")
	for _, point := range []string{snapshot.PauseImportConverting, snapshot.PauseImportWritten} {
		t.Run(point, func(t *testing.T) {
			w := newCrashWorld(t)
			cp := func(mnt string) error {
				out, err := exec.Command("cp", src, filepath.Join(mnt, "import/new")).CombinedOutput()
				if err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			}
			crash(t, w, point, cp, "volumes/new/head.raw", qemutest.ConvertRawFile(t, src))
			if _, err := os.Stat(filepath.Join(w.cfg.Mountpoint, "volumes/new")); !os.IsNotExist(err) {
				t.Errorf("volumes/new after an import killed before its commit: %v", err)
			}
			// And the import goes through now.
			if err := cp(w.cfg.Mountpoint); err != nil {
				t.Fatalf("import after restart: %v", err)
			}
			sameContent(t, filepath.Join(w.cfg.Mountpoint, "volumes/new/head.raw"), qemutest.ConvertRawFile(t, src))
		})
	}
}
