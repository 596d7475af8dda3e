//go:build libvirt && cgo

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
	"snapfs/virt/virttest"
)

// The binary under test gets the libvirt provider (and keeps the Ceph
// backend when mount_ceph_test.go, earlier in file order, asked for it).
func init() {
	if binaryTags != "" {
		binaryTags += ","
	}
	binaryTags, binaryCgo = binaryTags+"libvirt", "1"
}

// libvirtScripts is the project's scripts/libvirt, from this directory.
const libvirtScripts = "../../scripts/libvirt"

// TestMountLibvirtTestDriver checks the wiring on libvirt's test driver
// (in-process, no daemon): its domain shows under instances/ next to the
// local store's instance, with its disk linked to its file; an explicit
// --libvirt that cannot connect fails the mount; revert reaches the
// provider.
func TestMountLibvirtTestDriver(t *testing.T) {
	store := t.TempDir()
	mustSucceed(t, "volume", "create", "--store", store, "root", "16M")
	mustSucceed(t, "instance", "create", "--store", store, "web", "--disk", "vda=root")

	mnt := filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--libvirt", "test:///default")
	if got := listNames(t, filepath.Join(mnt, "instances")); !slices.Equal(got, []string{"test", "web"}) {
		t.Fatalf("ls instances/: %q, want the domain and the store's instance", got)
	}
	if got, err := os.Readlink(filepath.Join(mnt, "instances/test/disks/vda")); err != nil || got != "/guest/diskimage1" {
		t.Errorf("instances/test/disks/vda -> %q, %v: want the domain's disk file", got, err)
	}
	if got, err := os.Readlink(filepath.Join(mnt, "instances/web/disks/vda")); err != nil || got != "../../../volumes/root" {
		t.Errorf("instances/web/disks/vda -> %q, %v: want the store's volume", got, err)
	}
	var info struct {
		Name    string `json:"name"`
		Running bool   `json:"running"`
	}
	data, err := os.ReadFile(filepath.Join(mnt, "instances/test/info.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &info); err != nil || info.Name != "test" || !info.Running {
		t.Errorf("instances/test/info.json: %s (%v)", data, err)
	}

	// An explicit --libvirt that cannot connect is an error, not a quiet
	// mount without libvirt.
	mustFailWith(t, []string{"mount", "--store", store, "--libvirt", "qemu+unix:///system?socket=/nonexistent/sock", filepath.Join(t.TempDir(), "m2")},
		"--libvirt qemu+unix:///system?socket=/nonexistent/sock", "libvirt not reachable")

	// Revert goes to the provider of the instance: the domain has no
	// such snapshot; the store's instance cannot be reverted as a whole.
	mustFailWith(t, []string{"instance", "revert", "--store", store, "--libvirt", "test:///default", "test", "nope"}, "not found")
	mustFailWith(t, []string{"instance", "revert", "--store", store, "--libvirt", "test:///default", "web", "nope"}, "cannot be reverted")
	// The same through the mount's control file.
	if err := os.WriteFile(filepath.Join(mnt, "instances/test/revert"), []byte("nope\n"), 0); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("echo nope > instances/test/revert: %v, want ENOENT", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "instances/web/revert"), []byte("nope\n"), 0); !errors.Is(err, syscall.ENOTSUP) {
		t.Errorf("echo nope > instances/web/revert: %v, want ENOTSUP", err)
	}
}

// TestMountLibvirtRefusalLogged: a snapshot the provider refuses for what
// the instance cannot do gets ENOTSUP from mkdir, and the mount's log
// says why (here a running domain whose RBD disk's pool is not mounted, on
// libvirt's test driver): the errno alone does not.
func TestMountLibvirtRefusalLogged(t *testing.T) {
	node := filepath.Join(t.TempDir(), "node.xml")
	if err := os.WriteFile(node, []byte(`<node>
  <domain type='test'>
    <name>rbdvm</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='network' device='disk'>
        <driver name='qemu' type='raw'/>
        <source protocol='rbd' name='nopool/root'><host name='127.0.0.1'/></source>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</node>`), 0o600); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	m := startMount(t, t.TempDir(), mnt, "--libvirt", "test://"+node)
	if err := os.Mkdir(filepath.Join(mnt, "instances/rbdvm/snapshots/s1"), 0o755); !errors.Is(err, syscall.ENOTSUP) {
		t.Fatalf("mkdir on a domain whose RBD pool is not mounted: %v, want ENOTSUP", err)
	}
	if !m.waitOutput("mkdir instances/rbdvm/snapshots/s1: ") || !strings.Contains(m.output(), "nopool") {
		t.Errorf("the mount did not log why the snapshot was refused:\n%s", m.output())
	}
}

// startLibvirt builds the test guest (once: it is kept) and starts a
// private libvirtd with the project's scripts, stopped when the test ends.
// It returns the daemon's URI and the guest's directory.
func startLibvirt(t *testing.T) (uri, guestDir string) {
	t.Helper()
	guestDir, err := virttest.GuestDir()
	if err != nil {
		t.Fatal(err)
	}
	if err := virttest.BuildGuest(libvirtScripts, guestDir); err != nil {
		t.Fatal(err)
	}
	uri, stop, err := virttest.StartDaemon(libvirtScripts, guestDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return uri, guestDir
}

// readJSON decodes the JSON file at path into v.
func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v\n%s", path, err, data)
	}
}

// defineDomain defines a domain from xml, destroyed (if running) and
// undefined when the test ends.
func defineDomain(t *testing.T, conn *libvirt.Connect, xml string) *libvirt.Domain {
	t.Helper()
	dom, err := conn.DomainDefineXML(xml)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if active, _ := dom.IsActive(); active {
			dom.Destroy()
		}
		dom.Undefine()
		dom.Free()
	})
	return dom
}

// TestMountLibvirt is issue 6 through the real command: a running guest
// of a real libvirtd (the project's scripts) with two ext4 data disks it
// writes to; its disks show under instances/; mkdir takes a quiesced
// snapshot (meta.json says so, with the domain XML); each disk's vdX.raw
// reads exactly what `qemu-img convert` reads of the snapshot's layer
// chain; rmdir on the running domain merges the layer (block commit); and
// `snapfs instance revert` reverts the shut-off domain.
func TestMountLibvirt(t *testing.T) {
	uri, guestDir := startLibvirt(t)

	// The guest: two qcow2 data disks with ext4, as virt's tests make.
	work := t.TempDir()
	name := fmt.Sprintf("snapfs-mount-%d", time.Now().UnixNano()%100000)
	var disks []virttest.Disk
	for _, dev := range []string{"vdb", "vdc"} {
		raw := filepath.Join(work, dev+".raw")
		qemutest.Run(t, "truncate", "-s", "64M", raw)
		qemutest.Run(t, "mkfs.ext4", "-q", "-F", "-L", dev, raw)
		img := filepath.Join(work, dev+".qcow2")
		qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", raw, img)
		os.Remove(raw)
		disks = append(disks, virttest.Disk{Device: dev, File: img})
	}
	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	dom := defineDomain(t, conn, virttest.DomainXML(name, guestDir, filepath.Join(work, "console.log"), disks))
	if err := dom.Create(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := dom.QemuAgentCommand(`{"execute":"guest-ping"}`, 2, 0); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("guest agent not ready: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	store := t.TempDir()
	mnt := filepath.Join(t.TempDir(), "mnt")
	startMount(t, store, mnt, "--libvirt", uri, "--require-quiesce")
	if got := listNames(t, filepath.Join(mnt, "instances")); !slices.Contains(got, name) {
		t.Fatalf("ls instances/: %q, want %s", got, name)
	}
	inst := filepath.Join(mnt, "instances", name)
	if got := listNames(t, filepath.Join(inst, "disks")); !slices.Equal(got, []string{"vdb", "vdc"}) {
		t.Fatalf("ls instances/%s/disks: %q", name, got)
	}
	for _, d := range disks {
		if got, err := os.Readlink(filepath.Join(inst, "disks", d.Device)); err != nil || got != d.File {
			t.Errorf("disks/%s -> %q, %v: want %s", d.Device, got, err, d.File)
		}
	}

	if err := os.Mkdir(filepath.Join(inst, "snapshots/s1"), 0o755); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(inst, "snapshots/s1")
	if got := listNames(t, snap); !slices.Equal(got, []string{"meta.json", "vdb.qcow2", "vdb.raw", "vdc.qcow2", "vdc.raw"}) {
		t.Fatalf("ls snapshots/s1: %q", got)
	}
	var meta struct {
		Kind        string `json:"kind"`
		Consistency string `json:"consistency"`
		Frozen      int64  `json:"frozen_ns"`
		Disks       []struct {
			Device string `json:"device"`
			Size   int64  `json:"size"`
		} `json:"disks"`
		Provider struct {
			DomainXML string `json:"domain_xml"`
			Disks     []struct {
				Device string `json:"device"`
				Layer  string `json:"layer"`
			} `json:"disks"`
		} `json:"provider"`
	}
	readJSON(t, filepath.Join(snap, "meta.json"), &meta)
	if meta.Kind != "instance-snapshot" || meta.Consistency != "quiesced" || meta.Frozen <= 0 ||
		len(meta.Disks) != 2 || meta.Disks[0].Size != 64<<20 ||
		!strings.Contains(meta.Provider.DomainXML, "<name>"+name+"</name>") || len(meta.Provider.Disks) != 2 {
		t.Fatalf("meta.json: %+v", meta)
	}
	for _, d := range meta.Provider.Disks {
		want := qemutest.ConvertRawFile(t, d.Layer)
		qemutest.Compare(t, want, filepath.Join(snap, d.Device+".raw"))
		qemutest.Check(t, filepath.Join(snap, d.Device+".qcow2"))
		qemutest.Compare(t, want, filepath.Join(snap, d.Device+".qcow2"))
	}

	// rmdir on the running domain: block commit, the snapshot goes.
	if err := os.Mkdir(filepath.Join(inst, "snapshots/s2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(snap); err != nil {
		t.Fatal(err)
	}
	if got := listNames(t, filepath.Join(inst, "snapshots")); !slices.Equal(got, []string{"s2"}) {
		t.Fatalf("ls snapshots after rmdir s1: %q", got)
	}

	// Revert, through the CLI in another process, of the shut-off domain.
	if err := dom.Destroy(); err != nil {
		t.Fatal(err)
	}
	mustFailWith(t, []string{"instance", "revert", "--store", store, "--libvirt", uri, name, "s1"}, "not found")
	if out := mustSucceed(t, "instance", "revert", "--store", store, "--libvirt", uri, name, "s2"); !strings.Contains(out, "reverted") {
		t.Errorf("instance revert printed %q", out)
	}
	xml, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if strings.Contains(xml, "'"+d.File+"'") || strings.Contains(xml, `"`+d.File+`"`) {
			t.Errorf("after revert the domain still runs off %s:\n%s", d.File, xml)
		}
	}

	// Revert again through the mount's gesture: the domain's disks move
	// to new overlays over s2's layers once more.
	if err := os.WriteFile(filepath.Join(inst, "revert"), []byte("s2\n"), 0); err != nil {
		t.Fatalf("echo s2 > revert: %v", err)
	}
	xml2, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
	if err != nil {
		t.Fatal(err)
	}
	if xml2 == xml {
		t.Errorf("echo s2 > revert left the domain XML as it was:\n%s", xml2)
	}

	// With --json, revert prints the instance as it is now: shut off.
	var reverted snapshot.Instance
	decode(t, mustSucceed(t, "instance", "revert", "--store", store, "--json", "--libvirt", uri, name, "s2"), &reverted)
	if reverted.Name != name || reverted.Running || len(reverted.Disks) == 0 {
		t.Errorf("instance revert --json printed %+v", reverted)
	}
}
