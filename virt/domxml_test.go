package virt

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"snapfs/snapshot"
)

// A live domain XML as libvirt 9 writes it: a file disk with its backing
// chain, an RBD disk, a CD-ROM, a read-only disk, a block device.
const liveXML = `<domain type='qemu' id='3'>
  <name>web1</name>
  <uuid>0b7c2f8e-6c1e-4b0e-9a51-2f0e6c1d2a3b</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/vm/web1.snapfs-0a1b2c3d.qcow2' index='3'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/var/lib/vm/web1.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type="network" device="disk">
      <driver name="qemu" type="raw"/>
      <source protocol="rbd" name="vms/web1-data">
        <host name="10.0.0.1" port="6789"/>
      </source>
      <target dev="vdb" bus="virtio"/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/vm/seed.img'/>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-logs'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='disk' snapshot='no'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/vm/scratch.img'/>
      <target dev='vde' bus='virtio'/>
    </disk>
  </devices>
</domain>`

func TestParseDomainXML(t *testing.T) {
	d, disks, err := parseDomainXML(liveXML)
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "web1" || d.UUID != "0b7c2f8e-6c1e-4b0e-9a51-2f0e6c1d2a3b" {
		t.Errorf("name %q uuid %q", d.Name, d.UUID)
	}
	want := []struct {
		dev      string
		kind     DiskKind
		source   string
		snapshot bool
	}{
		{"vda", FileDisk, "/var/lib/vm/web1.snapfs-0a1b2c3d.qcow2", true},
		{"vdb", RBDDisk, "rbd:vms/web1-data", true},
		{"hdc", FileDisk, "/iso/install.iso", false},
		{"vdc", FileDisk, "/var/lib/vm/seed.img", false},
		{"vdd", OtherDisk, "block:/dev/vg0/web1-logs", false},
		{"vde", FileDisk, "/var/lib/vm/scratch.img", false},
	}
	if len(disks) != len(want) {
		t.Fatalf("got %d disks, want %d: %+v", len(disks), len(want), disks)
	}
	for i, w := range want {
		g := disks[i]
		if g.Device != w.dev || g.Kind != w.kind || g.Source != w.source || g.Snapshot != w.snapshot {
			t.Errorf("disk %d: got %+v, want %+v", i, g, w)
		}
		if !g.Snapshot && g.Why == "" {
			t.Errorf("disk %s is left out without a reason", g.Device)
		}
	}
	if disks[1].Pool != "vms" || disks[1].Image != "web1-data" {
		t.Errorf("rbd disk: pool %q image %q", disks[1].Pool, disks[1].Image)
	}
}

func TestParseDomainXMLRefuses(t *testing.T) {
	for name, doc := range map[string]string{
		"not XML":      "<domain><name>x</name>",
		"bad device":   `<domain><name>x</name><devices><disk type='file'><source file='/a'/><target dev='../etc'/></disk></devices></domain>`,
		"two vda":      `<domain><name>x</name><devices><disk type='file'><source file='/a'/><target dev='vda'/></disk><disk type='file'><source file='/b'/><target dev='vda'/></disk></devices></domain>`,
		"control char": "<domain><name>x</name><devices><disk type='file'><source file='/a'/><target dev='vd&#x1;'/></disk></devices></domain>",
	} {
		_, _, err := parseDomainXML(doc)
		if !errors.Is(err, snapshot.ErrInvalid) && !errors.Is(err, snapshot.ErrInvalidName) {
			t.Errorf("%s: got %v, want ErrInvalid or ErrInvalidName", name, err)
		}
	}
}

func TestRewriteDiskSources(t *testing.T) {
	out, err := rewriteDiskSources(liveXML, map[string]diskFile{
		"vda": {"/var/lib/vm/web1 'new'.qcow2", "qcow2"},
		"vde": {"/var/lib/vm/scratch.snapfs-00000000.qcow2", "qcow2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, disks, err := parseDomainXML(out)
	if err != nil {
		t.Fatalf("rewritten XML does not parse: %v\n%s", err, out)
	}
	if disks[0].Path != "/var/lib/vm/web1 'new'.qcow2" || disks[0].Format != "qcow2" {
		t.Errorf("vda: %+v", disks[0])
	}
	if disks[5].Path != "/var/lib/vm/scratch.snapfs-00000000.qcow2" || disks[5].Format != "qcow2" {
		t.Errorf("vde: %+v", disks[5])
	}
	if strings.Contains(out, "backingStore") || strings.Contains(out, "index='3'") {
		t.Errorf("backingStore or index left in:\n%s", out)
	}
	// Everything else is byte for byte what it was.
	for _, keep := range []string{
		`<source protocol="rbd" name="vms/web1-data">`, `<alias name='virtio-disk0'/>`,
		`<source file='/iso/install.iso'/>`, `<disk type='file' device='disk' snapshot='no'>`, `<domain type='qemu' id='3'>`,
	} {
		if !strings.Contains(out, keep) {
			t.Errorf("lost %s", keep)
		}
	}
	if _, err := rewriteDiskSources(liveXML, map[string]diskFile{"vdz": {"/x", "qcow2"}}); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("unknown device: got %v, want ErrNotFound", err)
	}
	if _, err := rewriteDiskSources(liveXML, map[string]diskFile{"vdb": {"/x", "qcow2"}}); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("network disk: got %v, want ErrInvalid", err)
	}
}

func TestRewriteInsertsDriverType(t *testing.T) {
	doc := `<domain><name>x</name><devices><disk type='file' device='disk'><driver name='qemu'/><source file='/a.img'/><target dev='vda'/></disk></devices></domain>`
	out, err := rewriteDiskSources(doc, map[string]diskFile{"vda": {"/b.qcow2", "qcow2"}})
	if err != nil {
		t.Fatal(err)
	}
	want := `<driver name='qemu' type='qcow2'/><source file='/b.qcow2'/>`
	if !strings.Contains(out, want) {
		t.Errorf("got %s, want it to contain %s", out, want)
	}
}

func TestSnapshotXML(t *testing.T) {
	doc := snapshotXML("s<1>", map[string]string{"vdb": "/d/b.qcow2", "vda": "/d/a'.qcow2"}, []string{"hdc"}, "/d/m.mem")
	for _, want := range []string{
		"<name>s&lt;1&gt;</name>", "<memory snapshot='external' file='/d/m.mem'/>",
		"<disk name='vda' snapshot='external'>", "<source file='/d/a&#39;.qcow2'/>", "<disk name='hdc' snapshot='no'/>",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("missing %s in\n%s", want, doc)
		}
	}
	if strings.Index(doc, "vda") > strings.Index(doc, "vdb") {
		t.Errorf("disks not in device order:\n%s", doc)
	}
}

func TestOverlayStem(t *testing.T) {
	for in, want := range map[string]string{
		"/v/web1.qcow2":                  "web1",
		"/v/web1.snapfs-0a1b2c3d.qcow2":  "web1",
		"/v/disk.img":                    "disk",
		"/v/noext":                       "noext",
		"/v/a.snapfs-zzzzzzzz.qcow2":     "a.snapfs-zzzzzzzz",
		"/v/x.snapfs-01234567.snapfs-89": "x",
	} {
		if got := overlayStem(in); got != want {
			t.Errorf("overlayStem(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestBackingFile reads chains that qemu-img made.
func TestBackingFile(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "raw", base, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, mid)
	// A relative backing name resolves against the image's directory.
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", top)
	chain, err := chainOf(top)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(chain, " ") != strings.Join([]string{top, mid, base}, " ") {
		t.Errorf("chain %v", chain)
	}
	if b, err := backingFile(base); err != nil || b != "" {
		t.Errorf("raw: %q, %v", b, err)
	}
	if _, err := backingFile(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file: no error")
	}
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func TestRecordStore(t *testing.T) {
	s := recordStore{dir: filepath.Join(t.TempDir(), "state")}
	d, err := s.load("u1")
	if err != nil || len(d.Snapshots) != 0 || d.UUID != "u1" {
		t.Fatalf("empty: %+v %v", d, err)
	}
	d.Snapshots = append(d.Snapshots, Record{Name: "a", Consistency: snapshot.Quiesced, Disks: []DiskRecord{{Device: "vda", Kind: FileDisk, Layer: "/l"}}})
	d.Created = []string{"/o"}
	if err := s.save(d); err != nil {
		t.Fatal(err)
	}
	got, err := s.load("u1")
	if err != nil || got.find("a") != 0 || got.Snapshots[0].disk("vda").Layer != "/l" || !got.ours("/o") {
		t.Fatalf("reloaded: %+v %v", got, err)
	}
	// A file that names another domain is refused, not used.
	os.Rename(s.path("u1"), s.path("u2"))
	if _, err := s.load("u2"); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("mismatched uuid: %v", err)
	}
	entries, _ := os.ReadDir(s.dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temp file left: %s", e.Name())
		}
	}
}
