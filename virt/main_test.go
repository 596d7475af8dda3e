//go:build libvirt && cgo

package virt

import (
	"fmt"
	"os"
	"testing"

	"snapfs/virt/virttest"
)

// The tests run against a real libvirtd with the qemu driver: the one
// SNAPFS_LIBVIRT_URI names, or one that TestMain starts with the project's
// scripts/libvirt/start.sh in a temp dir (root needed) and stops at the
// end. The guest (kernel + initramfs with qemu-ga) is built by
// scripts/libvirt/build-guest.sh into SNAPFS_GUEST_DIR, by default the user
// cache directory (snapfs/guest), where its Debian packages stay for the
// next run, as does the daemon's qemu capability cache (snapfs/libvirt-cache).
// package virttest does both, for the snapfs command's tests too.
var (
	testURI  string // libvirt URI of the test daemon
	guestDir string // holds vmlinuz and initrd.img
)

// scripts is the project's scripts/libvirt, from this package's directory.
const scripts = "../scripts/libvirt"

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	var err error
	if guestDir, err = virttest.GuestDir(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := virttest.BuildGuest(scripts, guestDir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testURI = os.Getenv("SNAPFS_LIBVIRT_URI")
	if testURI == "" {
		uri, stop, err := virttest.StartDaemon(scripts, guestDir)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer func() {
			if err := stop(); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
		}()
		testURI = uri
	}
	return m.Run()
}
