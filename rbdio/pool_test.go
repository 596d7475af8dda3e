//go:build ceph && cgo

package rbdio

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"snapfs/qcow"
	"snapfs/snapshot"
)

func TestVolumeLifecycle(t *testing.T) {
	p, c := pool(), ctx(t)
	name := uniqueName(t, "life")
	before := time.Now().Add(-time.Minute)
	v, err := p.CreateVolume(c, name, 10<<20+1)
	if err != nil {
		t.Fatal(err)
	}
	if v.Name != name || v.Size != 10<<20+512 || v.Parent != nil || v.Created.Before(before) ||
		v.HeadPath != "rbd:rbd/"+name || v.BytesUsed != 0 {
		t.Errorf("new volume: %+v", v)
	}
	var info struct {
		Size int64 `json:"size"`
	}
	if err := json.Unmarshal(cli(t, "rbd", "info", "--format", "json", "rbd/"+name), &info); err != nil || info.Size != v.Size {
		t.Errorf("rbd info size %d (%v), want %d", info.Size, err, v.Size)
	}
	if _, err := p.CreateVolume(c, name, 1<<20); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("create again: %v, want ErrExists", err)
	}
	for _, bad := range []string{"", ".hidden", "a/b", "a@b", strings.Repeat("x", 256)} {
		if _, err := p.CreateVolume(c, bad, 1<<20); !errors.Is(err, snapshot.ErrInvalidName) {
			t.Errorf("create %q: %v, want ErrInvalidName", bad, err)
		}
	}
	if _, err := p.CreateVolume(c, uniqueName(t, "size"), 0); !errors.Is(err, snapshot.ErrInvalid) {
		t.Errorf("size 0: %v, want ErrInvalid", err)
	}
	list, err := p.ListVolumes(c)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(list, func(v snapshot.Volume) bool { return v.Name == name }) {
		t.Errorf("ListVolumes lacks %s", name)
	}
	// An image whose name cannot be a volume is not listed.
	cli(t, "rbd", "create", "--size", "1M", "rbd/.not-a-volume")
	defer cli(t, "rbd", "rm", "--no-progress", "rbd/.not-a-volume")
	list, _ = p.ListVolumes(c)
	for _, v := range list {
		if strings.HasPrefix(v.Name, ".") {
			t.Errorf("ListVolumes shows %q", v.Name)
		}
	}
	if _, err := p.Volume(c, ".not-a-volume"); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("Volume(.not-a-volume): %v, want ErrNotFound", err)
	}
	if err := p.DeleteVolume(c, name); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Volume(c, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after delete: %v, want ErrNotFound", err)
	}
	if err := p.DeleteVolume(c, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("delete again: %v, want ErrNotFound", err)
	}
}

// sparseRaw writes a raw image of size bytes to a file: random data in
// some places, explicit zeros in others, holes elsewhere. It returns the
// path and the content.
func sparseRaw(t *testing.T, size int64) (string, []byte) {
	t.Helper()
	content := make([]byte, size)
	put := func(off int64, b []byte) { copy(content[off:], b) }
	put(0, randomBytes(64<<10))                      // first object, start
	put(3<<20+12345, randomBytes(1<<20))             // across objects 0 and 1
	put(9<<20, make([]byte, 2<<20))                  // zeros written explicitly (a hole after import)
	put(13<<20, randomBytes(4096))                   // one block
	put(13<<20+8192, randomBytes(4096))              // another, a zero block between
	put(size-100, []byte(strings.Repeat("end", 33))) // the last bytes
	path := filepath.Join(t.TempDir(), "src.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// Write only the non-zero 4 KiB blocks and the explicit zeros, so the
	// file has holes, as a guest disk image does.
	for off := int64(0); off < size; off += 4096 {
		b := content[off:min(off+4096, size)]
		if !isZeroBlock(b) || (off >= 9<<20 && off < 11<<20) {
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
	}
	return path, content
}

// importFile imports path (raw or qcow2) as volume name.
func importFile(t *testing.T, p *Pool, path, name string, meta map[string]string) snapshot.Volume {
	t.Helper()
	src, err := snapshot.OpenUntrusted(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	v, err := p.ImportVolume(ctx(t), name, src, meta)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// readAll reads a whole image with ReadAt in pieces of step bytes.
func readAll(t *testing.T, im qcow.Image, step int) []byte {
	t.Helper()
	out := make([]byte, im.Size())
	for off := 0; off < len(out); off += step {
		n, err := im.ReadAt(out[off:min(off+step, len(out))], int64(off))
		if err != nil && !(err == io.EOF && off+n == len(out)) {
			t.Fatalf("ReadAt %d: %v", off, err)
		}
	}
	return out
}

// rbdDu returns the used size `rbd du` reports for an image.
func rbdDu(t *testing.T, spec string) int64 {
	t.Helper()
	var du struct {
		Images []struct {
			Name     string `json:"name"`
			Snapshot string `json:"snapshot"`
			Used     int64  `json:"used_size"`
		} `json:"images"`
	}
	if err := json.Unmarshal(cli(t, "rbd", "du", "--format", "json", spec), &du); err != nil {
		t.Fatal(err)
	}
	var used int64
	for _, im := range du.Images {
		used += im.Used
	}
	return used
}

func TestImportExport(t *testing.T) {
	p, c := pool(), ctx(t)
	const size = 20<<20 + 1000 // not a whole number of sectors
	path, content := sparseRaw(t, size)
	name := uniqueName(t, "imp")
	meta := map[string]string{"owner": "test", "os": "debian"}
	v := importFile(t, p, path, name, meta)
	defer p.DeleteVolume(c, name)
	want := append(content, make([]byte, roundToSector(size)-size)...)
	if v.Size != int64(len(want)) {
		t.Errorf("size %d, want %d", v.Size, len(want))
	}
	if !maps(v.Metadata, meta) {
		t.Errorf("metadata %v, want %v", v.Metadata, meta)
	}
	if got := rbdExport(t, "rbd/"+name); !bytes.Equal(got, want) {
		t.Fatalf("rbd export differs from the imported file")
	}
	// Thin: the explicit zeros and the untouched objects are holes, and
	// BytesUsed is what rbd du says.
	if du := rbdDu(t, "rbd/"+name); v.BytesUsed != du || du > 4*(4<<20) {
		t.Errorf("BytesUsed %d, rbd du %d: want equal, at most 4 objects", v.BytesUsed, du)
	}
	var used []diffExtent = rbdDiff(t, "rbd/"+name)
	for _, e := range used {
		if e.Offset < 11<<20 && e.Offset+e.Length > 9<<20 {
			t.Errorf("zeros at 9-11 MiB were written: rbd diff %+v", e)
		}
	}
	head, err := p.OpenHead(c, name)
	if err != nil {
		t.Fatal(err)
	}
	defer head.Close()
	for _, step := range []int{1 << 20, 12345, 9 << 20} {
		if got := readAll(t, head, step); !bytes.Equal(got, want) {
			t.Errorf("OpenHead read in %d-byte pieces differs from the file", step)
		}
	}

	// The same image as qcow2 imports to the same bytes.
	qpath := filepath.Join(t.TempDir(), "src.qcow2")
	if out, err := runCmd("qemu-img", "convert", "-f", "raw", "-O", "qcow2", path, qpath); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	qname := uniqueName(t, "impq")
	importFile(t, p, qpath, qname, nil)
	defer p.DeleteVolume(c, qname)
	if got := rbdExport(t, "rbd/"+qname); !bytes.Equal(got, want) {
		t.Errorf("qcow2 import: rbd export differs from the file")
	}

	if _, err := p.ImportVolume(c, name, qcow.Image(head), nil); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("import over an existing volume: %v, want ErrExists", err)
	}
}

func maps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// failingImage reads as zeros... until it fails: a source that breaks in
// the middle of an import (a truncated qcow2, a disk error).
type failingImage struct {
	size, failAt int64
}

func (f *failingImage) Size() int64  { return f.size }
func (f *failingImage) Close() error { return nil }
func (f *failingImage) Extents(off, length int64) ([]qcow.Extent, error) {
	return []qcow.Extent{{Offset: off, Length: min(length, f.size-off), Kind: qcow.Data}}, nil
}
func (f *failingImage) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.failAt {
		return 0, qcow.ErrCorrupt
	}
	for i := range p {
		p[i] = byte(off + int64(i))
	}
	return len(p), nil
}

// tempImages lists the temporary images of imports in the test pool.
func tempImages(t *testing.T) []string { return imagesWithPrefix(t, tempPrefix) }

// doomedImages lists the images of deletes under way or cut short.
func doomedImages(t *testing.T) []string { return imagesWithPrefix(t, deletingPrefix) }

// imagesWithPrefix lists the images of the test pool whose names start
// with prefix.
func imagesWithPrefix(t *testing.T, prefix string) []string {
	var out []string
	for _, n := range strings.Fields(string(cli(t, "rbd", "ls", "rbd"))) {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

func TestImportAtomic(t *testing.T) {
	p, c := pool(), ctx(t)
	name := uniqueName(t, "atomic")
	_, err := p.ImportVolume(c, name, &failingImage{size: 24 << 20, failAt: 17 << 20}, nil)
	if !errors.Is(err, qcow.ErrCorrupt) {
		t.Errorf("failing import: %v, want qcow.ErrCorrupt", err)
	}
	if _, err := p.Volume(c, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after a failed import: %v, want ErrNotFound", err)
	}
	if tmp := tempImages(t); len(tmp) > 0 {
		t.Errorf("a failed import left %v", tmp)
	}

	// Cancelled in the middle: the same.
	cc, cancel := context.WithCancel(c)
	defer cancel()
	var once sync.Once
	cc = snapshot.WithProgress(cc, func(done, total int64) {
		if done > 4<<20 {
			once.Do(cancel)
		}
	})
	_, err = p.ImportVolume(cc, name, &failingImage{size: 24 << 20, failAt: 1 << 40}, nil)
	if err == nil {
		t.Errorf("cancelled import succeeded")
	}
	if _, err := p.Volume(c, name); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after a cancelled import: %v, want ErrNotFound", err)
	}
	if tmp := tempImages(t); len(tmp) > 0 {
		t.Errorf("a cancelled import left %v", tmp)
	}

	// An importer killed in the middle leaves its temp image, with nobody
	// watching it: the next Open removes it.
	orphan := tempPrefix + "0123456789abcdef"
	cli(t, "rbd", "create", "--size", "4M", "rbd/"+orphan)
	c2, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}})
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if tmp := tempImages(t); len(tmp) > 0 {
		t.Errorf("Open did not sweep %v", tmp)
	}
}

// TestDeleteVolumeCutShort: a delete renames the volume out of the pool
// before it removes anything, so one killed in the middle leaves no
// volume with half its snapshots, only a doomed image that no listing
// shows and that the next Open removes, snapshots (protected ones too)
// and all.
func TestDeleteVolumeCutShort(t *testing.T) {
	p, c := pool(), ctx(t)
	names := []string{uniqueName(t, "delete"), uniqueName(t, "cutshort")}
	for _, name := range names {
		if _, err := p.CreateVolume(c, name, 8<<20); err != nil {
			t.Fatal(err)
		}
		cli(t, "rbd", "bench", "--io-type", "write", "--io-total", "4M", "rbd/"+name)
		for _, snap := range []string{"s1", "s2"} {
			if _, err := p.CreateSnapshots(c, []string{name}, snap, snapshot.SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		cli(t, "rbd", "snap", "protect", "rbd/"+name+"@s1")
	}

	if err := p.DeleteVolume(c, names[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Volume(c, names[0]); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("after the delete: %v, want ErrNotFound", err)
	}
	if d := doomedImages(t); len(d) > 0 {
		t.Errorf("a delete that went through left %v", d)
	}

	// The state of a delete killed right after its rename.
	doomed := deletingPrefix + "0123456789abcdef"
	cli(t, "rbd", "rename", "rbd/"+names[1], "rbd/"+doomed)
	vols, err := p.ListVolumes(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vols {
		if v.Name == names[1] || strings.HasPrefix(v.Name, ".") {
			t.Errorf("ListVolumes shows %s during its delete", v.Name)
		}
	}
	// A read-only client changes nothing: it leaves the delete as it is.
	ro, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	ro.Close()
	if d := doomedImages(t); !slices.Equal(d, []string{doomed}) {
		t.Errorf("after a read-only Open: %v, want %s left as it was", d, doomed)
	}
	c2, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}})
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	if d := doomedImages(t); len(d) > 0 {
		t.Errorf("Open did not finish the delete of %v", d)
	}
}

func runCmd(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

func TestClosedCluster(t *testing.T) {
	c := ctx(t)
	cl, err := Open(Config{CephConf: cephConf, Pools: []string{testPool}})
	if err != nil {
		t.Fatal(err)
	}
	p := cl.Pools()[0]
	name := uniqueName(t, "closed")
	if _, err := p.CreateVolume(c, name, 1<<20); err != nil {
		t.Fatal(err)
	}
	defer pool().DeleteVolume(c, name)
	im, err := p.OpenHead(c, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Close(); !errors.Is(err, snapshot.ErrBusy) {
		t.Errorf("Close with an open image: %v, want ErrBusy", err)
	}
	im.Close()
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}
	// Calls after Close fail; librados would crash.
	if _, err := p.Volume(c, name); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Volume after Close: %v, want os.ErrClosed", err)
	}
	if _, err := p.ListVolumes(c); !errors.Is(err, os.ErrClosed) {
		t.Errorf("ListVolumes after Close: %v, want os.ErrClosed", err)
	}
	if _, err := p.CreateVolume(c, uniqueName(t, "x"), 1<<20); !errors.Is(err, os.ErrClosed) {
		t.Errorf("CreateVolume after Close: %v, want os.ErrClosed", err)
	}
}

func TestOpenErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want error
	}{
		{Config{CephConf: cephConf}, ErrConfig},
		{Config{CephConf: cephConf, Pools: []string{"rbd", "rbd"}}, ErrConfig},
		{Config{CephConf: cephConf, Pools: []string{"no-such-pool"}}, ErrConfig},
		{Config{CephConf: "/nonexistent/ceph.conf", Pools: []string{"rbd"}}, ErrConfig},
		{Config{CephConf: cephConf, ID: "nobody", Pools: []string{"rbd"}, Timeout: 5 * time.Second}, ErrConfig},
	} {
		if cl, err := Open(tc.cfg); !errors.Is(err, tc.want) {
			t.Errorf("Open(%+v): %v, want %v", tc.cfg, err, tc.want)
			if cl != nil {
				cl.Close()
			}
		}
	}
	// A cluster that is not there: a timeout, in time.
	conf := filepath.Join(t.TempDir(), "ceph.conf")
	os.WriteFile(conf, []byte("[global]\nmon host = 127.0.0.1:9\nauth client required = none\n"), 0o600)
	start := time.Now()
	_, err := Open(Config{CephConf: conf, Pools: []string{"rbd"}, Timeout: 2 * time.Second})
	if !errors.Is(err, ErrTimeout) || time.Since(start) > 10*time.Second {
		t.Errorf("Open of a dead cluster: %v after %v, want ErrTimeout within the timeout", err, time.Since(start))
	}
}
