package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// mountProc is a `snapfs mount` running in the background.
type mountProc struct {
	cmd    *exec.Cmd
	dir    string
	mu     sync.Mutex
	stderr bytes.Buffer
	exited chan struct{}
	err    error // of Wait, once exited
}

func (p *mountProc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.Write(b)
}

func (p *mountProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// waitOutput reports whether the mount's output holds substr, waiting up
// to 5 s for it: the process logs a refusal before it answers, but the
// line reaches the test through a pipe, maybe after the answer.
func (p *mountProc) waitOutput(substr string) bool {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if strings.Contains(p.output(), substr) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// isMounted reports whether something is mounted on dir.
func isMounted(dir string) bool {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// startMount runs `snapfs mount --store STORE args... MOUNTPOINT` (without
// --store when store is "") and waits until the mount serves. The test
// fails if the mount is still there when it ends.
func startMount(t *testing.T, store, dir string, args ...string) *mountProc {
	t.Helper()
	p := &mountProc{dir: dir, exited: make(chan struct{})}
	if store != "" {
		args = append([]string{"--store", store}, args...)
	}
	p.cmd = exec.Command(snapfsBin, append(append([]string{"mount"}, args...), dir)...)
	p.cmd.Stderr = p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.exited
		}
		if isMounted(dir) {
			t.Errorf("a mount was left behind at %s", dir)
			exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.output(), "mounted on") {
		select {
		case <-p.exited:
			t.Fatalf("snapfs mount exited: %v: %s", p.err, p.output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapfs mount did not start: %s", p.output())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return p
}

// waitExit waits for the mount process to exit and returns its error.
func (p *mountProc) waitExit(t *testing.T) error {
	t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(30 * time.Second):
		t.Fatalf("snapfs mount did not exit: %s", p.output())
		return nil
	}
}

// listNames returns the names in dir, sorted (as os.ReadDir sorts them).
func listNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestMountSignals(t *testing.T) {
	store, dir := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		p := startMount(t, store, dir)
		entries, err := os.ReadDir(dir)
		if err != nil || len(entries) != 3 {
			t.Fatalf("ls of the mount: %v, %v", entries, err)
		}
		p.cmd.Process.Signal(sig)
		if err := p.waitExit(t); err != nil {
			t.Fatalf("after %v: %v: %s", sig, err, p.output())
		}
		if isMounted(dir) {
			t.Fatalf("still mounted after %v", sig)
		}
	}

	// fusermount3 -u from outside ends it too.
	p := startMount(t, store, dir)
	if out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput(); err != nil {
		t.Fatalf("fusermount3 -u: %v: %s", err, out)
	}
	if err := p.waitExit(t); err != nil {
		t.Fatalf("after fusermount3 -u: %v: %s", err, p.output())
	}
}

// busyMount mounts a store, opens its volumes/ directory, and sends the
// mount a Ctrl-C, which finds it busy: the mount says so and stays.
func busyMount(t *testing.T) (p *mountProc, dir string, open *os.File) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "mnt")
	p = startMount(t, t.TempDir(), dir)
	open, err := os.Open(filepath.Join(dir, "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGINT)
	if !p.waitOutput("is busy") {
		t.Fatalf("no busy message: %s", p.output())
	}
	if !isMounted(dir) {
		t.Fatal("unmounted while busy")
	}
	return p, dir, open
}

// TestMountBusy: Ctrl-C while a file is open says so and keeps serving; a
// second one detaches the mount, and snapfs exits when the file is closed.
func TestMountBusy(t *testing.T) {
	p, dir, f := busyMount(t)
	deadline := time.Now().Add(10 * time.Second)
	if _, err := f.Readdirnames(-1); err != nil {
		t.Fatalf("the open directory stopped working: %v", err)
	}
	p.cmd.Process.Signal(syscall.SIGINT)
	for isMounted(dir) {
		if time.Now().After(deadline) {
			t.Fatalf("not detached after the second Ctrl-C: %s", p.output())
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-p.exited:
		t.Fatal("exited with a file still open")
	default:
	}
	f.Close()
	if err := p.waitExit(t); err != nil {
		t.Fatalf("exit: %v: %s", err, p.output())
	}
}

// TestMountBusyThenClosed: Ctrl-C while a file is open says "close it";
// closing it is then enough: snapfs unmounts and exits without a second
// Ctrl-C.
func TestMountBusyThenClosed(t *testing.T) {
	p, dir, f := busyMount(t)
	f.Close()
	if err := p.waitExit(t); err != nil {
		t.Fatalf("exit: %v: %s", err, p.output())
	}
	if isMounted(dir) {
		t.Fatal("still mounted after the file was closed")
	}
}

// TestMountStale: a mount left by a snapfs killed with -9 is reported, with
// the command that fixes it.
func TestMountStale(t *testing.T) {
	store, dir := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	p := startMount(t, store, dir)
	os.ReadDir(dir)
	p.cmd.Process.Kill()
	p.waitExit(t)
	t.Cleanup(func() { exec.Command("fusermount3", "-u", dir).Run() })
	if _, err := os.ReadDir(dir); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after kill -9: %v, want ENOTCONN", err)
	}
	mustFailWith(t, []string{"mount", "--store", store, dir}, dir, "stale mount", "fusermount3 -u "+dir)

	if out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput(); err != nil {
		t.Fatalf("the fix does not work: %v: %s", err, out)
	}
	p = startMount(t, store, dir)
	mustFailWith(t, []string{"mount", "--store", store, dir}, dir, "already mounted")
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.waitExit(t)
}

func TestMountReadOnly(t *testing.T) {
	store, dir := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	p := startMount(t, store, dir, "--read-only")
	err := os.WriteFile(filepath.Join(dir, "import", "x"), []byte("data"), 0o600)
	if !errors.Is(err, syscall.EROFS) {
		t.Errorf("import on a read-only mount: %v, want EROFS", err)
	}
	p.cmd.Process.Signal(syscall.SIGINT)
	p.waitExit(t)
}

func TestMountFlags(t *testing.T) {
	mustFailWith(t, []string{"mount", "--umask", "9", t.TempDir()}, "--umask")
	mustFailWith(t, []string{"mount"}, "usage: snapfs mount")
}

// TestMountImport: the whole path of the README: mount, cp into import/,
// mkdir a snapshot, read it back.
func TestMountImport(t *testing.T) {
	store, dir := t.TempDir(), filepath.Join(t.TempDir(), "mnt")
	p := startMount(t, store, dir, "--umask", "027")
	src := filepath.Join(t.TempDir(), "disk.raw")
	data := bytes.Repeat([]byte("snapfs"), 100000)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", src, filepath.Join(dir, "import", "disk")).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	if err := os.Mkdir(filepath.Join(dir, "volumes", "disk", "snapshots", "first"), 0o700); err != nil {
		t.Fatal(err)
	}
	// Raw images are taken as they are, their size rounded up to whole
	// 512-byte sectors, as qemu does.
	got, err := os.ReadFile(filepath.Join(dir, "volumes", "disk", "snapshots", "first", "disk.raw"))
	want := append(data, make([]byte, (512-len(data)%512)%512)...)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("disk.raw of the imported volume: %d bytes, %v; want %d bytes", len(got), err, len(want))
	}
	st, err := os.Stat(filepath.Join(dir, "volumes", "disk", "snapshots", "first", "disk.raw"))
	if err != nil || st.Mode().Perm() != 0o440 {
		t.Errorf("disk.raw with --umask 027: %v, %v", st.Mode(), err)
	}
	p.cmd.Process.Signal(syscall.SIGINT)
	if err := p.waitExit(t); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(p.output()))
	var logged bool
	for sc.Scan() {
		logged = logged || strings.Contains(sc.Text(), "imported volumes/disk")
	}
	if !logged {
		t.Errorf("the import was not logged: %s", p.output())
	}
}
