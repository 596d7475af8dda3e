//go:build libvirt && cgo

package virt

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
)

// TestDaemonHoldsNoFUSEMount: a FUSE mount that exists when
// scripts/libvirt/start.sh starts a daemon is not copied into the daemon's
// mount namespace, so that its unmount ends its connection while the
// daemon runs. A copy there kept the snapfs mounts of tests running
// meanwhile alive after their unmount: their servers waited for the
// daemon to stop. The mount point has a space, which mountinfo escapes.
func TestDaemonHoldsNoFUSEMount(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "a mount")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	server, err := gofs.Mount(mnt, &gofs.Inode{}, &gofs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			server.Unmount()
		}
	})

	// A daemon of its own, started after the mount (a short path: its
	// socket lives under it).
	dir, err := os.MkdirTemp("", "snapfs-lv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stop := exec.Command(filepath.Join(scripts, "stop.sh"), dir)
		stop.Stderr = os.Stderr
		if err := stop.Run(); err != nil {
			t.Errorf("stopping the daemon: %v", err)
		}
		os.RemoveAll(dir)
	})
	start := exec.Command(filepath.Join(scripts, "start.sh"), dir)
	start.Env = append(os.Environ(), "LIBVIRT_OWNER_PID="+strconv.Itoa(os.Getpid()),
		"LIBVIRT_CACHE_DIR="+filepath.Join(filepath.Dir(guestDir), "libvirt-cache"))
	start.Stderr = os.Stderr
	if out, err := start.Output(); err != nil {
		t.Fatalf("start.sh: %v\n%s", err, out)
	}
	pid, err := os.ReadFile(filepath.Join(dir, "run", "libvirtd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join("/proc", strings.TrimSpace(string(pid)), "mountinfo"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	unescape := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && unescape.Replace(fields[4]) == mnt {
			t.Errorf("the daemon's namespace holds the FUSE mount: %s", sc.Text())
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}

	// Unmounted on the host, the mount is gone: its server returns.
	// (Unmount waits for that: with a copy in the daemon's namespace, until
	// the daemon stops, in the cleanup.)
	mounted = false
	done := make(chan error, 1)
	go func() {
		err := server.Unmount()
		server.Wait()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		// Not a time limit on the server: a bound on a hang, which the
		// daemon's copy of the mount would make last until it stops.
		t.Errorf("the FUSE server still serves a minute after its unmount")
	}
}
