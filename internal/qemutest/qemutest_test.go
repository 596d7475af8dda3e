package qemutest

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestHelpers runs every helper on one image and checks them against each
// other: what qemu-io writes is what ConvertRaw reads and what Map reports.
func TestHelpers(t *testing.T) {
	dir := t.TempDir()
	img := Create(t, "qcow2", filepath.Join(dir, "a.qcow2"), "1M", "-o", "cluster_size=4k")
	out := IO(t, img, "write -P 7 4k 8k", "write -z 64k 4k")
	if !bytes.Contains([]byte(out), []byte("wrote 8192/8192 bytes at offset 4096")) {
		t.Errorf("qemu-io output: %q", out)
	}
	raw := ConvertRaw(t, img)
	want := make([]byte, 1<<20)
	copy(want[4096:], bytes.Repeat([]byte{7}, 8192))
	if !bytes.Equal(raw, want) {
		t.Error("ConvertRaw does not read what qemu-io wrote")
	}
	var data, zero int64
	for _, m := range Map(t, img) {
		switch {
		case m.Data:
			data += m.Length
		case m.Present:
			zero += m.Length
		}
	}
	if data != 8192 || zero != 4096 {
		t.Errorf("Map: %d data bytes and %d zero-cluster bytes, want 8192 and 4096", data, zero)
	}
	if r := Check(t, img); r.AllocatedClusters != 2 {
		t.Errorf("Check: %d allocated clusters, want 2 (the data; the zero write allocates nothing)", r.AllocatedClusters)
	}
	copyImg := filepath.Join(dir, "b.qcow2")
	Img(t, "convert", "-O", "qcow2", img, copyImg)
	Compare(t, img, copyImg)
	Compare(t, img, ConvertRawFile(t, img))

	lazy := Create(t, "qcow2", filepath.Join(dir, "lazy.qcow2"), "1M", "-o", "lazy_refcounts=on")
	IOCrash(t, lazy, "write 0 4k")
	if info := ImgInfo(t, lazy); !info.DirtyFlag || !info.FormatSpecific.Data.LazyRefcounts {
		t.Errorf("after IOCrash: %+v; want dirty with lazy refcounts", info)
	}
	top := Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "1M", "-b", "a.qcow2", "-F", "qcow2")
	if chain := ImgInfoChain(t, top); len(chain) != 2 || chain[0].BackingFilename != "a.qcow2" || chain[1].ClusterSize != 4096 {
		t.Errorf("ImgInfoChain: %+v", chain)
	}
}
