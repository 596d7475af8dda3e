//go:build libvirt && cgo

package virt

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"snapfs/snapshot"
)

// TestReconnectAfterDaemonRestart: libvirtd restarts under an open
// provider (an upgrade, a crash): while it is down, calls fail with
// ErrUnavailable, and once it is back they work again on a new
// connection, without reopening the provider (a mount would otherwise
// show instances/ as EIO until it is restarted).
func TestReconnectAfterDaemonRestart(t *testing.T) {
	// A daemon of its own (a short path: its socket lives under it).
	dir, err := os.MkdirTemp("", "snapfs-lv-")
	if err != nil {
		t.Fatal(err)
	}
	script := func(name string) {
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
