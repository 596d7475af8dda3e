//go:build libvirt && cgo

// Package virttest starts what the libvirt tests of snapfs run against,
// for the tests of package virt and of the snapfs command alike: a private
// libvirtd (scripts/libvirt/start.sh), the tiny test guest
// (scripts/libvirt/build-guest.sh), and the XML of a domain that boots it
// with qcow2 data disks.
package virttest

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// GuestDir returns where the test guest lives: SNAPFS_GUEST_DIR, else the
// user cache directory's snapfs/guest, where its Debian packages stay for
// the next run.
func GuestDir() (string, error) {
	if d := os.Getenv("SNAPFS_GUEST_DIR"); d != "" {
		return d, nil
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "snapfs", "guest"), nil
}

// BuildGuest builds the guest (vmlinuz, initrd.img) into dir with the
// project's script, found in scripts (the repository's scripts/libvirt),
// unless it is built already. Its output goes to stderr.
func BuildGuest(scripts, dir string) error {
	build := exec.Command(filepath.Join(scripts, "build-guest.sh"), dir)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("building the test guest: %w", err)
	}
	return nil
}

// StartDaemon starts a private libvirtd with the project's script (root
// needed) in a new temp dir and returns its URI and the function that
// stops it and removes the dir. If this process dies first (a panic, a
// test timeout), the script's watchdog stops the daemon and its guests.
// The qemu capability probe is cached next to guestDir: a daemon in a new
// dir then starts in 0.2 s, not 10.
func StartDaemon(scripts, guestDir string) (uri string, stop func() error, err error) {
	// A short path: the daemon's socket lives under it.
	dir, err := os.MkdirTemp("", "snapfs-lv-")
	if err != nil {
		return "", nil, err
	}
	stop = func() error {
		defer os.RemoveAll(dir)
		cmd := exec.Command(filepath.Join(scripts, "stop.sh"), dir)
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("stopping the test libvirtd: %w", err)
		}
		return nil
	}
	start := exec.Command(filepath.Join(scripts, "start.sh"), dir)
	start.Env = append(os.Environ(), "LIBVIRT_OWNER_PID="+strconv.Itoa(os.Getpid()),
		"LIBVIRT_CACHE_DIR="+filepath.Join(filepath.Dir(guestDir), "libvirt-cache"))
	start.Stderr = os.Stderr
	out, err := start.Output()
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("starting the test libvirtd: %w\n%s", err, out)
	}
	uri = lastValue(out, "LIBVIRT_URI=")
	if uri == "" {
		stop()
		return "", nil, fmt.Errorf("start.sh printed no LIBVIRT_URI:\n%s", out)
	}
	return uri, stop, nil
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

// Disk is a qcow2 data disk of a test domain.
type Disk struct {
	Device string // vdb, vdc, ...
	File   string // the qcow2 file
}

// DomainXML returns the XML of a TCG domain called name that boots the
// test guest of guestDir with the given disks, its serial console appended
// to the file console, and a guest agent channel. cmdline adds to the
// kernel command line (snapfs.freeze_hook: see build-guest.sh).
func DomainXML(name, guestDir, console string, disks []Disk, cmdline ...string) string {
	var disksXML strings.Builder
	for _, d := range disks {
		fmt.Fprintf(&disksXML, `
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%s'/>
      <target dev='%s' bus='virtio'/>
    </disk>`, d.File, d.Device)
	}
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 quiet%s</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>%s
    <serial type='file'>
      <source path='%s' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>`, name, filepath.Join(guestDir, "vmlinuz"), filepath.Join(guestDir, "initrd.img"),
		strings.Join(append([]string{""}, cmdline...), " "), disksXML.String(), console)
}
