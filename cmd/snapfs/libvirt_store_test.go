//go:build libvirt && cgo

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
	"snapfs/snapshot"
	"snapfs/virt/virttest"
)

// TestMountLibvirtStoreHead is issue 6 for a domain that runs off a
// local-store volume's head (issue 3): mkdir instances/DOM/snapshots/s1
// through the mount, while the guest writes, makes s1 a snapshot of the
// volume in the store (volume list shows it), whose disk.raw is a clean
// ext4 reading exactly as qemu-img reads the layer, and the volume's
// head_path the file qemu now writes to. rmdir on the running domain is
// refused with EBUSY.
func TestMountLibvirtStoreHead(t *testing.T) {
	uri, guestDir := startLibvirt(t)

	// The volume: an ext4 filesystem imported into the store.
	work := t.TempDir()
	store := filepath.Join(work, "store")
	st := "--store=" + store
	raw := filepath.Join(work, "vdb.raw")
	qemutest.Run(t, "truncate", "-s", "64M", raw)
	qemutest.Run(t, "mkfs.ext4", "-q", "-F", "-L", "vdb", raw)
	s, err := snapshot.OpenLocal(store)
	if err != nil {
		t.Fatal(err)
	}
	src, err := qcow.OpenPath(raw, qcow.Options{})
	if err != nil {
		t.Fatal(err)
	}
	vol, err := s.ImportVolume(context.Background(), "data", src, nil)
	src.Close()
	s.Close()
	if err != nil {
		t.Fatal(err)
	}
	oldHead := vol.HeadPath

	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	name := fmt.Sprintf("snapfs-storehead-%d", time.Now().UnixNano()%100000)
	console := filepath.Join(work, "console.log")
	dom := defineDomain(t, conn, virttest.DomainXML(name, guestDir, console, []virttest.Disk{{Device: "vdb", File: oldHead}}))
	if err := dom.Create(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, console, 2)

	mnt := filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--libvirt", uri, "--require-quiesce")
	inst := filepath.Join(mnt, "instances", name)
	if got, err := os.Readlink(filepath.Join(inst, "disks", "vdb")); err != nil || !strings.HasSuffix(got, "volumes/data") {
		t.Fatalf("disks/vdb -> %q, %v: want the volume", got, err)
	}
	if err := os.Mkdir(filepath.Join(inst, "snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}

	// The store's view: s1 is the old head, the head a new file qemu runs off.
	var info struct {
		HeadPath string `json:"head_path"`
	}
	b, err := os.ReadFile(filepath.Join(mnt, "volumes/data/info.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &info); err != nil {
		t.Fatal(err)
	}
	if layer := mustSnapshotPath(t, st, "data", "s1"); layer != oldHead {
		t.Errorf("volume list: s1 is %s, want the old head %s", layer, oldHead)
	}
	if info.HeadPath == oldHead || info.HeadPath != headOf(t, st, "data") {
		t.Errorf("info.json head_path %s, old head %s", info.HeadPath, oldHead)
	}
	xml, err := dom.GetXMLDesc(0)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(xml, "'"+info.HeadPath+"'") {
		t.Errorf("the domain does not run off head_path %s", info.HeadPath)
	}

	// disk.raw of s1 is the frozen filesystem, as qemu-img reads the layer.
	got, err := os.ReadFile(filepath.Join(mnt, "volumes/data/snapshots/s1/disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(work, "s1.raw")
	qemutest.Run(t, "qemu-img", "convert", "-U", "-O", "raw", oldHead, want)
	wantBytes, err := os.ReadFile(want)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(wantBytes) {
		t.Error("disk.raw of s1 differs from qemu-img convert of its layer")
	}
	if out := qemutest.Run(t, "dumpe2fs", "-h", want); strings.Contains(out, "needs_recovery") {
		t.Error("s1 is an ext4 that needs recovery: not quiesced")
	}

	// The guest writes on, into the new head.
	n := heartbeats(t, console)
	waitHeartbeats(t, console, n+3)
	empty := filepath.Join(work, "empty.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", oldHead, "-F", "qcow2", empty)
	if a, b := fileSizeOf(t, info.HeadPath), fileSizeOf(t, empty); a <= b {
		t.Errorf("the new head is %d bytes, an empty overlay %d: the guest does not write to it", a, b)
	}

	if err := os.Remove(filepath.Join(inst, "snapshots/s1")); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("rmdir on the running domain: %v, want EBUSY", err)
	}
	if layer := mustSnapshotPath(t, st, "data", "s1"); layer != oldHead {
		t.Errorf("after the refused rmdir s1 is %s", layer)
	}
}

// heartbeats counts the guest's heartbeat lines on its console.
func heartbeats(t *testing.T, console string) int {
	t.Helper()
	b, _ := os.ReadFile(console)
	return strings.Count(string(b), "HB ")
}

// waitHeartbeats waits until the console shows n heartbeats.
func waitHeartbeats(t *testing.T, console string, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for heartbeats(t, console) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the guest wrote %d heartbeats, want %d", heartbeats(t, console), n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// fileSizeOf returns the size of a file.
func fileSizeOf(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
