//go:build libvirt && cgo

package virt

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/snapshot"
)

// TestReconnectAfterDaemonRestart: libvirtd restarts under an open
// provider (an upgrade, a crash): while it is down, calls fail with
// ErrUnavailable, and once it is back they work again on a new
// connection, without reopening the provider (a mount would otherwise
// show instances/ as EIO until it is restarted).
func TestReconnectAfterDaemonRestart(t *testing.T) {
	dir, script := ownDaemon(t)
	uri := "qemu+unix:///system?socket=" + filepath.Join(dir, "run", "libvirt-sock")
	p := testDriver(t, Config{}, uri)
	ctx := testCtx(t)
	if _, err := p.ListInstances(ctx); err != nil {
		t.Fatal(err)
	}

	script("stop.sh")
	if _, err := p.ListInstances(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("with libvirtd stopped: %v, want ErrUnavailable", err)
	}
	script("start.sh") // the same socket
	if _, err := p.ListInstances(ctx); err != nil {
		t.Errorf("with libvirtd started again: %v", err)
	}
	if _, err := p.Instance(ctx, "nope"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("lookup after the restart: %v, want ErrNotFound", err)
	}
}

// ownDaemon starts a libvirtd of the test's own with the project's script
// (a short path: its socket lives under it), stopped when the test ends,
// and returns its directory and the function that runs start.sh or
// stop.sh on it.
func ownDaemon(t *testing.T) (dir string, script func(name string)) {
	t.Helper()
	dir, err := os.MkdirTemp("", "snapfs-lv-")
	if err != nil {
		t.Fatal(err)
	}
	script = func(name string) {
		t.Helper()
		cmd := exec.Command(filepath.Join(scripts, name), dir)
		cmd.Env = append(os.Environ(), "LIBVIRT_OWNER_PID="+strconv.Itoa(os.Getpid()),
			"LIBVIRT_CACHE_DIR="+filepath.Join(filepath.Dir(guestDir), "libvirt-cache"))
		cmd.Stderr = os.Stderr
		if out, err := cmd.Output(); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
	}
	t.Cleanup(func() {
		script("stop.sh")
		os.RemoveAll(dir)
	})
	script("start.sh")
	return dir, script
}

// TestDaemonHung: a libvirtd that stops answering (SIGSTOP here; a hung
// daemon) makes calls fail within their bounds (keepalive, then the dial's
// wait), ETIMEDOUT, instead of hanging the mount's ls of instances/; once
// it answers again, so do the calls.
func TestDaemonHung(t *testing.T) {
	dir, _ := ownDaemon(t)
	uri := "qemu+unix:///system?socket=" + filepath.Join(dir, "run", "libvirt-sock")
	p := testDriver(t, Config{}, uri)
	ctx := testCtx(t)
	if _, err := p.ListInstances(ctx); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "run", "libvirtd.outer.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	for i := range 2 {
		done := make(chan error, 1)
		go func() {
			_, err := p.ListInstances(ctx)
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.ETIMEDOUT) {
				t.Errorf("call %d to a stopped libvirtd: %v, want ErrUnavailable and ETIMEDOUT", i+1, err)
			}
		case <-time.After(2 * time.Minute):
			syscall.Kill(pid, syscall.SIGCONT)
			resumed = true
			t.Fatalf("call %d to a stopped libvirtd still waits after 2 minutes", i+1)
		}
	}
	syscall.Kill(pid, syscall.SIGCONT)
	resumed = true
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := p.ListInstances(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("libvirtd answers again, the provider does not: %v", err)
		}
		time.Sleep(time.Second)
	}
}
