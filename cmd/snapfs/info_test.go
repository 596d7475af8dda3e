package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"snapfs/internal/qemutest"
)

// infoCase is an image made by qemu-img for `snapfs info` to describe.
type infoCase struct {
	name string
	// make creates the image in dir and returns its path.
	make func(t *testing.T, dir string) string
}

var infoCases = []infoCase{
	{"qcow2 v3 defaults", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, "v3.qcow2"), "64M")
		qemutest.IO(t, img, "write -P 1 0 1M", "write -P 2 10M 64k", "write -z 20M 1M")
		return img
	}},
	{"qcow2 v2 4k clusters", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, "v2.qcow2"), "10M", "-o", "compat=0.10,cluster_size=4k")
		qemutest.IO(t, img, "write -P 3 4k 100k")
		return img
	}},
	{"qcow2 zstd extended_l2 lazy refcount_bits=1 odd size", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, "feat.qcow2"), "10000000",
			"-o", "cluster_size=128k,extended_l2=on,compression_type=zstd,lazy_refcounts=on,refcount_bits=1")
		qemutest.IO(t, img, "write -P 4 0 8k", "write -c -P 5 1M 128k", "write -z 2M 256k")
		return img
	}},
	{"internal snapshots", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, "snaps.qcow2"), "16M")
		qemutest.IO(t, img, "write -P 6 0 1M")
		qemutest.Img(t, "snapshot", "-c", "first", img)
		qemutest.IO(t, img, "write -P 7 512k 1M")
		qemutest.Img(t, "snapshot", "-c", "second one", img)
		return img
	}},
	{"raw", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, "raw", filepath.Join(dir, "disk.raw"), "3M")
		// Dense: qemu-img map counts the holes of a sparse raw file as
		// zeros, and a raw layer is all data to snapfs.
		qemutest.IO(t, img, "write -P 8 0 3M")
		return img
	}},
	{"chain raw <- qcow2 <- qcow2", func(t *testing.T, dir string) string {
		base := qemutest.Create(t, "raw", filepath.Join(dir, "base.raw"), "4M")
		qemutest.IO(t, base, "write -P 9 0 4M")
		mid := qemutest.Create(t, "qcow2", filepath.Join(dir, "mid.qcow2"), "8M", "-b", "base.raw", "-F", "raw")
		qemutest.IO(t, mid, "write -P 10 1M 2M", "write -z 6M 1M")
		top := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "8M", "-b", "mid.qcow2", "-F", "qcow2")
		qemutest.IO(t, top, "write -P 11 2M 64k", "write -z 0 512k")
		return top
	}},
	{"chain of 4 qcow2 with holes", func(t *testing.T, dir string) string {
		prev := qemutest.Create(t, "qcow2", filepath.Join(dir, "l0.qcow2"), "32M")
		qemutest.IO(t, prev, "write -P 20 0 4M")
		for i := 1; i < 4; i++ {
			img := qemutest.Create(t, "qcow2", filepath.Join(dir, fmt.Sprintf("l%d.qcow2", i)), "32M",
				"-b", filepath.Base(prev), "-F", "qcow2")
			qemutest.IO(t, img, fmt.Sprintf("write -P %d %dM 3M", 20+i, i*3), fmt.Sprintf("write -z %dM 64k", i))
			prev = img
		}
		return prev
	}},
}

// jsonInfo is `snapfs info --json` as a script sees it: plain JSON names
// and strings, independent of the Go types that print it.
type jsonInfo struct {
	Filename       string      `json:"filename"`
	Format         string      `json:"format"`
	VirtualSize    int64       `json:"virtual_size"`
	ClusterSize    int64       `json:"cluster_size"`
	Compression    string      `json:"compression_type"`
	Features       []string    `json:"features"`
	AllocatedBytes int64       `json:"allocated_bytes"`
	BackingFile    string      `json:"backing_file"`
	BackingFormat  string      `json:"backing_format"`
	RefcountBits   int         `json:"refcount_bits"`
	Snapshots      []jsonSnap  `json:"snapshots"`
	Chain          []jsonLayer `json:"chain"`
}

// jsonLayer is one layer of the chain in `snapfs info --json`.
type jsonLayer struct {
	Name           string     `json:"name"`
	Format         string     `json:"format"`
	VirtualSize    int64      `json:"virtual_size"`
	ClusterSize    int64      `json:"cluster_size"`
	Version        int        `json:"version"`
	Compression    string     `json:"compression_type"`
	RefcountBits   int        `json:"refcount_bits"`
	Features       []string   `json:"features"`
	BackingName    string     `json:"backing_file"`
	BackingFormat  string     `json:"backing_format"`
	Snapshots      []jsonSnap `json:"snapshots"`
	AllocatedBytes int64      `json:"allocated_bytes"`
}

// jsonSnap is an internal snapshot in `snapfs info --json`.
type jsonSnap struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	Created      time.Time `json:"created"`
	VMStateBytes uint64    `json:"vm_state_bytes"`
}

// qemuChainInfo is one image of `qemu-img info --backing-chain --output=json`.
type qemuChainInfo struct {
	qemutest.Info
	Filename string `json:"filename"`
}

// qemuChain returns what qemu-img says about every layer of img's chain.
func qemuChain(t *testing.T, img string) []qemuChainInfo {
	t.Helper()
	var chain []qemuChainInfo
	if err := json.Unmarshal([]byte(qemutest.Img(t, "info", "--backing-chain", "--output=json", img)), &chain); err != nil {
		t.Fatal(err)
	}
	return chain
}

// qemuAllocated counts the bytes that qemu-img map says are stored as data.
// With layerOnly, the image is read without its backing file, so only its
// own clusters count.
func qemuAllocated(t *testing.T, img string, format string, layerOnly bool) int64 {
	t.Helper()
	target := img
	if layerOnly && format == "qcow2" {
		abs, err := filepath.Abs(img)
		if err != nil {
			t.Fatal(err)
		}
		opts, _ := json.Marshal(map[string]any{"driver": "qcow2", "backing": nil,
			"file": map[string]any{"driver": "file", "filename": abs}})
		target = "json:" + string(opts)
	}
	var n int64
	for _, e := range qemutest.Map(t, target) {
		if e.Data && !e.Zero {
			n += e.Length
		}
	}
	return n
}

func TestInfoMatchesQemuImg(t *testing.T) {
	for _, tc := range infoCases {
		t.Run(tc.name, func(t *testing.T) {
			img := tc.make(t, t.TempDir())
			var got jsonInfo
			if err := json.Unmarshal([]byte(mustSucceed(t, "info", "--json", img)), &got); err != nil {
				t.Fatalf("snapfs info --json is not JSON: %v", err)
			}
			want := qemuChain(t, img)
			if len(got.Chain) != len(want) {
				t.Fatalf("chain has %d layers, qemu-img says %d", len(got.Chain), len(want))
			}
			if got.Filename != img {
				t.Errorf("filename %q, want %q as given", got.Filename, img)
			}
			top := want[0]
			if got.Format != top.Format || got.VirtualSize != top.VirtualSize {
				t.Errorf("top: %s %d bytes, qemu-img says %s %d", got.Format, got.VirtualSize, top.Format, top.VirtualSize)
			}
			if got.BackingFile != top.BackingFilename || got.BackingFormat != top.BackingFormat {
				t.Errorf("backing %q (%q), qemu-img says %q (%q)", got.BackingFile, got.BackingFormat, top.BackingFilename, top.BackingFormat)
			}
			if a := qemuAllocated(t, img, top.Format, false); got.AllocatedBytes != a {
				t.Errorf("allocated %d bytes, qemu-img map says %d", got.AllocatedBytes, a)
			}
			for i, w := range want {
				checkLayer(t, i, got.Chain[i], w, qemuAllocated(t, w.Filename, w.Format, true))
			}
			// The top image's own fields repeat its chain entry.
			l0 := got.Chain[0]
			if got.ClusterSize != l0.ClusterSize || got.RefcountBits != l0.RefcountBits ||
				strings.Join(got.Features, ",") != strings.Join(l0.Features, ",") || len(got.Snapshots) != len(l0.Snapshots) {
				t.Errorf("top-level fields %+v disagree with chain[0] %+v", got, l0)
			}
		})
	}
}

// checkLayer compares layer i of `snapfs info --json` with qemu-img's view of
// the same file.
func checkLayer(t *testing.T, i int, got jsonLayer, want qemuChainInfo, allocated int64) {
	t.Helper()
	if !filepath.IsAbs(got.Name) || filepath.Base(got.Name) != filepath.Base(want.Filename) {
		t.Errorf("layer %d: name %q, want the absolute path of %q", i, got.Name, want.Filename)
	}
	if _, err := os.Stat(got.Name); err != nil {
		t.Errorf("layer %d: %v", i, err)
	}
	if got.Format != want.Format || got.VirtualSize != want.VirtualSize {
		t.Errorf("layer %d: %s %d bytes, qemu-img says %s %d", i, got.Format, got.VirtualSize, want.Format, want.VirtualSize)
	}
	if got.AllocatedBytes != allocated {
		t.Errorf("layer %d: %d bytes allocated, qemu-img map says %d", i, got.AllocatedBytes, allocated)
	}
	if want.Format != "qcow2" {
		return
	}
	d := want.FormatSpecific.Data
	compression := got.Compression
	compat := map[int]string{2: "0.10", 3: "1.1"}[got.Version]
	has := func(f string) bool {
		for _, g := range got.Features {
			if g == f {
				return true
			}
		}
		return false
	}
	if got.ClusterSize != want.ClusterSize || compat != d.Compat || compression != d.CompressionType ||
		got.RefcountBits != d.RefcountBits || has("lazy_refcounts") != d.LazyRefcounts || has("extended_l2") != d.ExtendedL2 {
		t.Errorf("layer %d: cluster %d compat %s compression %q refcount bits %d features %v; qemu-img says %+v %+v",
			i, got.ClusterSize, compat, compression, got.RefcountBits, got.Features, want.ClusterSize, d)
	}
	if got.BackingName != want.BackingFilename || got.BackingFormat != want.BackingFormat {
		t.Errorf("layer %d: backing %q (%q), qemu-img says %q (%q)", i, got.BackingName, got.BackingFormat, want.BackingFilename, want.BackingFormat)
	}
	if len(got.Snapshots) != len(want.Snapshots) {
		t.Fatalf("layer %d: %d snapshots, qemu-img says %d", i, len(got.Snapshots), len(want.Snapshots))
	}
	for j, s := range want.Snapshots {
		g := got.Snapshots[j]
		if g.ID != s.ID || g.Name != s.Name || g.VMStateBytes != s.VMStateSize || g.Created.Unix() != s.DateSec {
			t.Errorf("layer %d snapshot %d: %+v, qemu-img says %+v", i, j, g, s)
		}
	}
}

func TestInfoHumanOutput(t *testing.T) {
	dir := t.TempDir()
	base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "64M", "-o", "compression_type=zstd")
	qemutest.IO(t, base, "write -P 1 0 1M")
	qemutest.Img(t, "snapshot", "-c", "before-upgrade", base)
	top := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "64M",
		"-b", "base.qcow2", "-F", "qcow2", "-o", "lazy_refcounts=on")
	qemutest.IO(t, top, "write -P 2 1M 1M")

	out := mustSucceed(t, "info", top)
	for _, want := range []string{
		"image: " + top + "\n",
		"file format: qcow2\n",
		"virtual size: 64 MiB (67108864 bytes)\n",
		"allocated: 2 MiB (2097152 bytes)\n",
		"cluster_size: 65536\n",
		"compat: 1.1\n",
		"compression type: zlib\n",
		"features: lazy_refcounts\n",
		"backing file: base.qcow2 (actual path: " + base + ")\n",
		"backing file format: qcow2\n",
		"Backing chain (2 layers):\n",
		"Snapshot list of layer 1 (" + base + "):\n",
		"before-upgrade",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("snapfs info output lacks %q:\n%s", want, out)
		}
	}
	for _, row := range []string{
		`(?m)^ +0 +qcow2 +64 MiB +1 MiB +` + regexp.QuoteMeta(top) + `$`,
		`(?m)^ +1 +qcow2 +64 MiB +1 MiB +` + regexp.QuoteMeta(base) + `$`,
	} {
		if !regexp.MustCompile(row).MatchString(out) {
			t.Errorf("snapfs info output has no chain row matching %s:\n%s", row, out)
		}
	}
	if out := mustSucceed(t, "info", base); !strings.Contains(out, "Backing chain (1 layer):\n") {
		t.Errorf("snapfs info of a lone image:\n%s", out)
	}
}

// TestInfoQuotesHostileNames: names read from an image are data; terminal
// escapes and newlines in them must not reach the terminal as they are.
func TestInfoQuotesHostileNames(t *testing.T) {
	img := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "evil.qcow2"), "1M")
	evil := "evil\x1b[31mred\nimage: /etc/passwd"
	qemutest.Img(t, "snapshot", "-c", evil, img)
	out := mustSucceed(t, "info", img)
	if strings.ContainsAny(out, "\x1b") || strings.Contains(out, "\nimage: /etc/passwd") {
		t.Errorf("info printed a hostile name as it is:\n%q", out)
	}
	if !strings.Contains(out, strconv.Quote(evil)) {
		t.Errorf("info does not show the name quoted:\n%s", out)
	}
	// JSON escapes it by itself, and keeps it exact.
	var got jsonInfo
	if err := json.Unmarshal([]byte(mustSucceed(t, "info", "--json", img)), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Snapshots) != 1 || got.Snapshots[0].Name != evil {
		t.Errorf("snapshots %+v, want one named %q", got.Snapshots, evil)
	}
}

func TestInfoErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}

	missing := filepath.Join(dir, "missing.qcow2")
	mustFailWith(t, []string{"info", missing}, missing, "no such file")

	// A qcow2 magic number with version 9.
	badVersion := write("version9.qcow2", append([]byte("QFI\xfb\x00\x00\x00\x09"), make([]byte, 504)...))
	mustFailWith(t, []string{"info", badVersion}, badVersion, "version")

	luks := filepath.Join(dir, "luks.qcow2")
	qemutest.CreateLUKS(t, luks)
	mustFailWith(t, []string{"info", luks}, luks, "encrypt")

	// A truncated image: the L2 table is gone.
	truncated := qemutest.Create(t, "qcow2", filepath.Join(dir, "truncated.qcow2"), "64M")
	qemutest.IO(t, truncated, "write -P 1 0 1M")
	if err := os.Truncate(truncated, 3*64<<10); err != nil {
		t.Fatal(err)
	}
	mustFailWith(t, []string{"info", truncated}, truncated, "corrupt")

	// The backing file has gone.
	gone := qemutest.Create(t, "qcow2", filepath.Join(dir, "gone.qcow2"), "1M")
	orphan := qemutest.Create(t, "qcow2", filepath.Join(dir, "orphan.qcow2"), "1M", "-b", "gone.qcow2", "-F", "qcow2")
	os.Remove(gone)
	mustFailWith(t, []string{"info", orphan}, orphan, "gone.qcow2")

	// Two images that back each other.
	a := qemutest.Create(t, "qcow2", filepath.Join(dir, "a.qcow2"), "1M")
	b := qemutest.Create(t, "qcow2", filepath.Join(dir, "b.qcow2"), "1M", "-b", "a.qcow2", "-F", "qcow2")
	qemutest.Img(t, "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
	mustFailWith(t, []string{"info", b}, b, "loop")

	// A directory is not an image.
	mustFailWith(t, []string{"info", dir}, dir)
}
