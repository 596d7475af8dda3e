package qcow_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// writeChain builds a three-layer chain with every kind of cluster: data in
// each layer, zero clusters over data, compressed data, a base shorter than
// the top, and a virtual size that is not a multiple of the cluster size.
func writeChain(t *testing.T, dir string) string {
	t.Helper()
	base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "3M", "-o", "cluster_size=4k")
	qemutest.IO(t, base, "write -P 0x11 0 1M", "write -c -P 0x22 1M 64k", "write -P 0x33 2M 512k")
	mid := qemutest.Create(t, "qcow2", filepath.Join(dir, "mid.qcow2"), "5M", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, mid, "write -P 0x44 512k 1M", "write -z 2M 128k", "write -P 0x55 4M 100k")
	top := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "5000001", "-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=16k")
	qemutest.IO(t, top, "write -P 0x66 100k 50k", "write -z 4M 64k", "write -P 0x77 4800k 80k")
	return top
}

func openChain(t testing.TB, path string) *qcow.Chain {
	t.Helper()
	c, err := qcow.OpenPath(path, qcow.Options{})
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func convertTo(t *testing.T, src qcow.Image, out string, opts qcow.ConvertOptions) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := qcow.Convert(context.Background(), f, src, opts); err != nil {
		t.Fatalf("convert to %s: %v", out, err)
	}
}

func compression(c qcow.Compression) *qcow.Compression { return &c }

// TestConvertMatchesQemu writes every output kind and judges it with
// qemu-img: raw equals qemu-img's own flattening, qcow2 checks clean and
// compares identical.
func TestConvertMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	top := writeChain(t, dir)
	want := qemutest.ConvertRaw(t, top)
	src := openChain(t, top)

	raw := filepath.Join(dir, "out.raw")
	convertTo(t, src, raw, qcow.ConvertOptions{Format: qcow.FormatRaw})
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("raw output differs from qemu-img convert -O raw")
	}

	cases := []struct {
		name string
		opts qcow.ConvertOptions
	}{
		{"qcow2-64k", qcow.ConvertOptions{}},
		{"qcow2-512", qcow.ConvertOptions{ClusterSize: 512}},
		{"qcow2-2m", qcow.ConvertOptions{ClusterSize: 2 << 20}},
		{"zlib-64k", qcow.ConvertOptions{Compression: compression(qcow.CompressionZlib)}},
		{"zlib-512", qcow.ConvertOptions{Compression: compression(qcow.CompressionZlib), ClusterSize: 512}},
		{"zstd-64k", qcow.ConvertOptions{Compression: compression(qcow.CompressionZstd)}},
		{"zstd-2m", qcow.ConvertOptions{Compression: compression(qcow.CompressionZstd), ClusterSize: 2 << 20}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), tc.name+".qcow2")
			tc.opts.Format = qcow.FormatQcow2
			convertTo(t, src, out, tc.opts)
			qemutest.Check(t, out)
			qemutest.Compare(t, top, out)
			// And our reader agrees with qemu about what we wrote.
			if got := readAll(t, openChain(t, out)); !bytes.Equal(got, want) {
				t.Fatalf("our reader reads our output differently from the source")
			}
		})
	}
}

// TestConvertZerosAreHoles: zero and unallocated ranges take no space in
// raw output, and no clusters in qcow2 output.
func TestConvertZerosAreHoles(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "sparse.qcow2"), "1G")
	qemutest.IO(t, img, "write -P 1 0 1M", "write -z 100M 10M", "write -P 2 900M 1M")
	src := openChain(t, img)
	raw := filepath.Join(dir, "out.raw")
	convertTo(t, src, raw, qcow.ConvertOptions{Format: qcow.FormatRaw})
	if used := diskUsage(t, raw); used > 4<<20 {
		t.Errorf("raw output of 2 MiB of data uses %d bytes on disk", used)
	}
	q := filepath.Join(dir, "out.qcow2")
	convertTo(t, src, q, qcow.ConvertOptions{Format: qcow.FormatQcow2})
	qemutest.Check(t, q)
	qemutest.Compare(t, img, q)
	if st, _ := os.Stat(q); st.Size() > 3<<20 {
		t.Errorf("qcow2 output of 2 MiB of data is %d bytes", st.Size())
	}
}

func diskUsage(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestConvertBase writes an overlay holding only what differs from a base,
// including clusters that became zero.
func TestConvertBase(t *testing.T) {
	dir := t.TempDir()
	base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "8M")
	qemutest.IO(t, base, "write -P 1 0 8M")
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "8M")
	qemutest.IO(t, img, "write -P 1 0 8M", "write -P 2 1M 128k", "write -z 5M 64k")
	src, b := openChain(t, img), openChain(t, base)
	ov := filepath.Join(dir, "ov.qcow2")
	convertTo(t, src, ov, qcow.ConvertOptions{Format: qcow.FormatQcow2, Base: b, BackingName: "base.qcow2", BackingFormat: "qcow2",
		Compression: compression(qcow.CompressionZstd)})
	qemutest.Check(t, ov)
	qemutest.Compare(t, img, ov)
	var data, zero int64
	for _, e := range qemutest.Map(t, ov) {
		if e.Depth == 0 && e.Data {
			data += e.Length
		}
		if e.Depth == 0 && e.Zero {
			zero += e.Length
		}
	}
	if data != 128<<10 || zero != 64<<10 {
		t.Errorf("overlay holds %d bytes of data and %d of zeros, want 128 KiB and 64 KiB", data, zero)
	}
}

// TestExport checks the virtual export: known size, deterministic bytes,
// random access equal to sequential access, and a file qemu accepts.
func TestExport(t *testing.T) {
	dir := t.TempDir()
	top := writeChain(t, dir)
	src := openChain(t, top)
	for _, cs := range []int64{512, 64 << 10, 2 << 20} {
		e, err := qcow.NewExport(src, qcow.ExportOptions{ClusterSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		whole := make([]byte, e.Size())
		if n, err := e.ReadAt(whole, 0); n != len(whole) || err != nil {
			t.Fatalf("read whole export: %d, %v", n, err)
		}
		again := readAll(t, e)
		if !bytes.Equal(whole, again) {
			t.Fatalf("cluster size %d: two reads of the export differ", cs)
		}
		rng := rand.New(rand.NewPCG(1, uint64(cs)))
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 200; i++ {
					off := rng.Int64N(e.Size())
					buf := make([]byte, rng.IntN(300000))
					n, err := e.ReadAt(buf, off)
					if err != nil && !errors.Is(err, io.EOF) {
						t.Errorf("read at %d: %v", off, err)
						return
					}
					if !bytes.Equal(buf[:n], whole[off:off+int64(n)]) {
						t.Errorf("cluster size %d: read of %d at %d differs", cs, len(buf), off)
						return
					}
				}
			}()
		}
		wg.Wait()
		out := filepath.Join(dir, "export.qcow2")
		if err := os.WriteFile(out, whole, 0o600); err != nil {
			t.Fatal(err)
		}
		qemutest.Check(t, out)
		qemutest.Compare(t, top, out)
	}
}

// TestExportOverlay exports only what the top layer changes over the
// layers below, named as their backing file.
func TestExportOverlay(t *testing.T) {
	dir := t.TempDir()
	top := writeChain(t, dir)
	src := openChain(t, top)
	ext, err := src.Extents(0, src.Size())
	if err != nil {
		t.Fatal(err)
	}
	e, err := qcow.NewExport(src, qcow.ExportOptions{BackingName: "mid.qcow2", BackingFormat: "qcow2", Delta: qcow.ExtentsAbove(ext, 1)})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "delta.qcow2")
	if err := os.WriteFile(out, readAll(t, e), 0o600); err != nil {
		t.Fatal(err)
	}
	qemutest.Check(t, out)
	qemutest.Compare(t, top, out)
	// 50k and 100k of data, rounded to 64 KiB clusters, plus metadata.
	if e.DataBytes() > 4*64<<10 {
		t.Errorf("overlay holds %d bytes of data for 150 KiB of change", e.DataBytes())
	}
}

// TestCreateOverlay: an empty overlay reads as its backing file; an empty
// standalone image reads as zeros.
func TestCreateOverlay(t *testing.T) {
	dir := t.TempDir()
	base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "10M")
	qemutest.IO(t, base, "write -P 9 1M 1M")
	for _, tc := range []struct{ name, backing string }{{"ov.qcow2", "base.qcow2"}, {"empty.qcow2", ""}} {
		f, err := os.Create(filepath.Join(dir, tc.name))
		if err != nil {
			t.Fatal(err)
		}
		if err := qcow.CreateOverlay(f, 10<<20, 0, tc.backing, "qcow2"); err != nil {
			t.Fatal(err)
		}
		f.Close()
		qemutest.Check(t, f.Name())
	}
	qemutest.Compare(t, base, filepath.Join(dir, "ov.qcow2"))
	qemutest.Img(t, "create", "-q", "-f", "raw", filepath.Join(dir, "zero.raw"), "10M")
	qemutest.Compare(t, filepath.Join(dir, "zero.raw"), filepath.Join(dir, "empty.qcow2"))
}

// TestConvertCancel stops at a cancelled context with its error.
func TestConvertCancel(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.Create(t, "qcow2", filepath.Join(dir, "img.qcow2"), "64M")
	qemutest.IO(t, img, "write -P 3 0 64M")
	src := openChain(t, img)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, opts := range []qcow.ConvertOptions{{Format: qcow.FormatRaw}, {Format: qcow.FormatQcow2},
		{Format: qcow.FormatQcow2, Compression: compression(qcow.CompressionZlib)}} {
		f, err := os.Create(filepath.Join(dir, "out"))
		if err != nil {
			t.Fatal(err)
		}
		err = qcow.Convert(ctx, f, src, opts)
		f.Close()
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%+v: got %v, want context.Canceled", opts, err)
		}
	}
}

func readAll(t *testing.T, r interface {
	io.ReaderAt
	Size() int64
}) []byte {
	t.Helper()
	buf := make([]byte, r.Size())
	if n, err := r.ReadAt(buf, 0); n != len(buf) || (err != nil && !errors.Is(err, io.EOF)) {
		t.Fatalf("read %d of %d bytes: %v", n, len(buf), err)
	}
	return buf
}

// TestRawHoles: holes of a sparse raw layer are zero extents, as qemu-img
// map says, and stay holes when flattened.
func TestRawHoles(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 8<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c := openChain(t, raw)
	ext, err := c.Extents(0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range ext {
		if e.Kind == qcow.Data {
			data += e.Length
		}
	}
	for _, m := range qemutest.Map(t, raw) {
		if m.Data {
			data -= m.Length
		}
	}
	if data != 0 {
		t.Errorf("our map and qemu-img map disagree on data by %d bytes: %+v", data, ext)
	}
	out := filepath.Join(dir, "out.raw")
	convertTo(t, c, out, qcow.ConvertOptions{Format: qcow.FormatRaw})
	if used := diskUsage(t, out); used > 2<<20 {
		t.Errorf("flattened sparse raw uses %d bytes", used)
	}
	qemutest.Compare(t, raw, out)
}
