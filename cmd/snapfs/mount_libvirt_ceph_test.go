//go:build ceph && pacific && libvirt && cgo

package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/internal/qemutest"
	"snapfs/virt/virttest"
)

// TestMountLibvirtCeph is issue 6's RBD disks through the real command: a
// domain of a real libvirtd with a qcow2 file disk (vda) and an RBD network
// disk (vdb, an ext4 filesystem, cephx through a libvirt secret) in a pool
// of a real Ceph cluster, mounted with the local store, the pool and
// libvirt. vdb links to the pool's volume and resolves. Shut off, mkdir
// takes an RBD snapshot through the pool's backend, recorded as
// crash-consistent, whose vdb.raw reads exactly what `rbd export` reads;
// rmdir removes it. Running (qemu's rbd driver writing to the image, the
// guest writing to its filesystem), mkdir freezes the guest, the snapshot
// is quiesced and its filesystem clean; rmdir removes it.
func TestMountLibvirtCeph(t *testing.T) {
	conf := startCeph(t)
	uri, guestDir := startLibvirt(t)

	// The RBD image: an ext4 filesystem, which the test guest mounts and
	// writes to when it runs.
	work := t.TempDir()
	raw := filepath.Join(work, "vdb.raw")
	qemutest.Run(t, "truncate", "-s", "32M", raw)
	qemutest.Run(t, "mkfs.ext4", "-q", "-F", "-L", "vdb", raw)
	rbd(t, conf, "import", "--no-progress", raw, "rbd/vm-data")
	imported, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}

	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	secret := cephSecret(t, conn, conf)

	// The domain, defined shut off: vda a qcow2 file, vdb the RBD image at
	// the mon's v1 address (a bare host:port is v1 to librbd).
	confText, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`v1:127\.0\.0\.1:(\d+)`).FindSubmatch(confText)
	if m == nil {
		t.Fatalf("no v1 mon address in %s:\n%s", conf, confText)
	}
	vda := qemutest.Create(t, "qcow2", filepath.Join(work, "vda.qcow2"), "8M")
	qemutest.IO(t, vda, "write -P 0x77 0 1M")
	const name = "snapfs-rbd"
	console := filepath.Join(work, "console.log")
	xml := virttest.DomainXML(name, guestDir, console, []virttest.Disk{{Device: "vda", File: vda}})
	xml = strings.Replace(xml, "</emulator>", fmt.Sprintf(`</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='admin'><secret type='ceph' uuid='%s'/></auth>
      <source protocol='rbd' name='rbd/vm-data'>
        <host name='127.0.0.1' port='%s'/>
      </source>
      <target dev='vdb' bus='virtio'/>
    </disk>`, secret, m[1]), 1)
	dom := defineDomain(t, conn, xml)

	store := t.TempDir()
	mnt := filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--ceph-conf", conf, "--pool", "rbd", "--libvirt", uri)
	inst := filepath.Join(mnt, "instances", name)
	if got := listNames(t, filepath.Join(inst, "disks")); !slices.Equal(got, []string{"vda", "vdb"}) {
		t.Fatalf("ls instances/%s/disks: %q", name, got)
	}
	if got, err := os.Readlink(filepath.Join(inst, "disks/vda")); err != nil || got != vda {
		t.Errorf("disks/vda -> %q, %v: want %s", got, err, vda)
	}
	if got, err := os.Readlink(filepath.Join(inst, "disks/vdb")); err != nil || got != "../../../pools/rbd/volumes/vm-data" {
		t.Errorf("disks/vdb -> %q, %v: want the pool's volume", got, err)
	}
	// The link resolves inside the mount, to the image's volume directory.
	if got := listNames(t, filepath.Join(inst, "disks/vdb")); !slices.Contains(got, "snapshots") {
		t.Errorf("ls instances/%s/disks/vdb/: %q, want the volume's directory", name, got)
	}

	// hasSnap says whether `rbd snap ls` lists snapshot snap of the image.
	hasSnap := func(t *testing.T, snap string) bool {
		t.Helper()
		for _, l := range strings.Split(string(rbd(t, conf, "snap", "ls", "rbd/vm-data")), "\n") {
			if f := strings.Fields(l); len(f) > 1 && f[1] == snap {
				return true
			}
		}
		return false
	}
	// take runs mkdir instances/DOM/snapshots/S and checks the result: the
	// consistency meta.json records, the RBD snapshot that virt made (by
	// the name it recorded), vdb.raw against `rbd export` of it, and
	// vda.raw against qemu-img's read of vda's layer. It returns the RBD
	// export.
	take := func(t *testing.T, s, consistency string) []byte {
		t.Helper()
		snap := filepath.Join(inst, "snapshots", s)
		if err := os.Mkdir(snap, 0o755); err != nil {
			t.Fatal(err)
		}
		var meta struct {
			Consistency string `json:"consistency"`
			Provider    struct {
				Disks []struct {
					Device string `json:"device"`
					Layer  string `json:"layer"`
				} `json:"disks"`
			} `json:"provider"`
		}
		readJSON(t, filepath.Join(snap, "meta.json"), &meta)
		if meta.Consistency != consistency || len(meta.Provider.Disks) != 2 {
			t.Fatalf("meta.json: %s, %d disks, want %s, 2 disks", meta.Consistency, len(meta.Provider.Disks), consistency)
		}
		layers := map[string]string{}
		for _, d := range meta.Provider.Disks {
			layers[d.Device] = d.Layer
		}
		image, rbdSnap, ok := strings.Cut(strings.TrimPrefix(layers["vdb"], "rbd:"), "@")
		if !ok || image != "rbd/vm-data" {
			t.Fatalf("meta.json: vdb's layer is %q, want rbd:rbd/vm-data@SNAP", layers["vdb"])
		}
		if !hasSnap(t, rbdSnap) {
			t.Fatalf("rbd snap ls after mkdir: no snapshot %q", rbdSnap)
		}
		want := rbd(t, conf, "export", "--no-progress", "rbd/vm-data@"+rbdSnap, "-")
		if got, err := os.ReadFile(filepath.Join(snap, "vdb.raw")); err != nil || !bytes.Equal(got, want) {
			t.Errorf("vdb.raw (%d bytes, %v) differs from rbd export (%d bytes)", len(got), err, len(want))
		}
		// -U: a running qemu holds vda's layer open (read-only).
		vdaRaw := filepath.Join(t.TempDir(), "vda.raw")
		qemutest.Img(t, "convert", "-U", "-O", "raw", layers["vda"], vdaRaw)
		qemutest.Compare(t, vdaRaw, filepath.Join(snap, "vda.raw"))

		if err := os.Remove(snap); err != nil {
			t.Fatal(err)
		}
		if hasSnap(t, rbdSnap) {
			t.Errorf("rbd snap ls after rmdir: snapshot %q is still there", rbdSnap)
		}
		if got := listNames(t, filepath.Join(inst, "snapshots")); len(got) != 0 {
			t.Errorf("ls snapshots after rmdir: %q", got)
		}
		return want
	}

	if !t.Run("shutoff", func(t *testing.T) {
		if got := take(t, "s1", "crash-consistent"); !bytes.Equal(got, imported) {
			t.Errorf("the snapshot of the shut-off domain's image differs from what was imported")
		}
	}) {
		return
	}

	t.Run("running", func(t *testing.T) {
		if err := virttest.BuildGuest(libvirtScripts, guestDir); err != nil {
			t.Fatal(err)
		}
		if err := dom.Create(); err != nil {
			t.Fatal(err)
		}
		// qemu opened the image through librbd and the guest mounted it:
		// it writes to it from now on.
		deadline := time.Now().Add(3 * time.Minute)
		for {
			_, err := dom.QemuAgentCommand(`{"execute":"guest-ping"}`, 2, 0)
			out, _ := os.ReadFile(console)
			if err == nil && bytes.Contains(out, []byte("GUEST: mounted /dev/vdb")) {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("guest not ready: agent %v; console:\n%s", err, out)
			}
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(time.Second) // a few heartbeats into the journal
		snap := filepath.Join(t.TempDir(), "snap.raw")
		if err := os.WriteFile(snap, take(t, "s2", "quiesced"), 0o600); err != nil {
			t.Fatal(err)
		}
		if out := qemutest.Run(t, "dumpe2fs", "-h", snap); strings.Contains(out, "needs_recovery") {
			t.Errorf("the quiesced snapshot's filesystem needs recovery:\n%s", out)
		}
		if out, err := exec.Command("e2fsck", "-fn", snap).CombinedOutput(); err != nil {
			t.Errorf("e2fsck -fn of the quiesced snapshot: %v\n%s", err, out)
		}
		// What the guest wrote through qemu's rbd driver is in it.
		if out := qemutest.Run(t, "debugfs", "-R", "cat /heartbeat", snap); !strings.HasPrefix(out, "1 ") {
			t.Errorf("the snapshot's /heartbeat, which the guest writes: %q", out)
		}
	})
}

// cephSecret defines a libvirt secret holding the key of client.admin of
// the test cluster of conf (its keyring is next to it), for the domain's
// RBD disk, and returns its UUID; it is undefined at cleanup.
func cephSecret(t *testing.T, conn *libvirt.Connect, conf string) string {
	t.Helper()
	keyring, err := os.ReadFile(filepath.Join(filepath.Dir(conf), "keyring"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)\[client\.admin\][^\[]*?key\s*=\s*(\S+)`).FindSubmatch(keyring)
	if m == nil {
		t.Fatalf("no key of client.admin in the keyring:\n%s", keyring)
	}
	key, err := base64.StdEncoding.DecodeString(string(m[1]))
	if err != nil {
		t.Fatal(err)
	}
	sec, err := conn.SecretDefineXML(`<secret ephemeral='yes' private='yes'>
  <usage type='ceph'><name>snapfs test client.admin</name></usage>
</secret>`, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sec.Undefine()
		sec.Free()
	})
	if err := sec.SetValue(key, 0); err != nil {
		t.Fatal(err)
	}
	uuid, err := sec.GetUUIDString()
	if err != nil {
		t.Fatal(err)
	}
	return uuid
}
