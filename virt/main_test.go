//go:build libvirt && cgo

package virt

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The tests run against a real libvirtd with the qemu driver: the one
// SNAPFS_LIBVIRT_URI names, or one that TestMain starts with the project's
// scripts/libvirt/start.sh in a temp dir (root needed) and stops at the
// end. The guest (kernel + initramfs with qemu-ga) is built by
// scripts/libvirt/build-guest.sh into SNAPFS_GUEST_DIR, by default the user
// cache directory (snapfs/guest), where its Debian packages stay for the
// next run, as does the daemon's qemu capability cache (snapfs/libvirt-cache).
var (
	testURI  string // libvirt URI of the test daemon
	guestDir string // holds vmlinuz and initrd.img
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	guestDir = os.Getenv("SNAPFS_GUEST_DIR")
	if guestDir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		guestDir = filepath.Join(cache, "snapfs", "guest")
	}
	build := exec.Command("../scripts/libvirt/build-guest.sh", guestDir)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building the test guest: %v\n", err)
		return 1
	}

	testURI = os.Getenv("SNAPFS_LIBVIRT_URI")
	if testURI == "" {
		// A short path: the daemon's socket lives under it.
		dir, err := os.MkdirTemp("", "snapfs-lv-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		start := exec.Command("../scripts/libvirt/start.sh", dir)
		// If this binary dies before it stops the daemon (a panic, a
		// test timeout), the script's watchdog stops it and its guests.
		// The qemu capability probe is cached next to the guest: a
		// daemon in a new dir then starts in 0.2 s, not 10.
		start.Env = append(os.Environ(), "LIBVIRT_OWNER_PID="+strconv.Itoa(os.Getpid()),
			"LIBVIRT_CACHE_DIR="+filepath.Join(filepath.Dir(guestDir), "libvirt-cache"))
		start.Stderr = os.Stderr
		out, err := start.Output()
		defer func() {
			stop := exec.Command("../scripts/libvirt/stop.sh", dir)
			stop.Stderr = os.Stderr
			if err := stop.Run(); err != nil {
				fmt.Fprintf(os.Stderr, "stopping the test libvirtd: %v\n", err)
			}
		}()
		if err != nil {
			fmt.Fprintf(os.Stderr, "starting the test libvirtd: %v\n%s", err, out)
			return 1
		}
		testURI = lastValue(out, "LIBVIRT_URI=")
		if testURI == "" {
			fmt.Fprintf(os.Stderr, "start.sh printed no LIBVIRT_URI:\n%s", out)
			return 1
		}
	}
	return m.Run()
}

// lastValue returns what follows prefix on the last line of out that
// starts with it.
func lastValue(out []byte, prefix string) string {
	var v string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if s, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			v = s
		}
	}
	return v
}
