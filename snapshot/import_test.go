package snapshot

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// importFile imports the image file at path as volume name, as the CLI
// and the mount do: OpenUntrusted, then ImportVolume.
func importFile(ctx context.Context, s *LocalStore, name, path string, meta map[string]string) (Volume, error) {
	img, err := OpenUntrusted(path)
	if err != nil {
		return Volume{}, err
	}
	defer img.Close()
	return s.ImportVolume(ctx, name, img, meta)
}

func TestImport(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t)

	// raw, with holes, a size that is not a multiple of 512, and a name
	// that says qcow2: the content decides.
	raw := filepath.Join(dir, "disk.qcow2")
	data := make([]byte, 3<<20+1000)
	for i := range 1 << 20 {
		data[i] = byte(i * 7)
	}
	copy(data[len(data)-600:], bytes.Repeat([]byte{0xee}, 600))
	if err := os.WriteFile(raw, data, 0o600); err != nil {
		t.Fatal(err)
	}
	// qcow2 with every kind of cluster: small clusters, compressed data,
	// zero clusters.
	q := qemutest.Create(t, "qcow2", filepath.Join(dir, "src.raw"), "5M", "-o", "cluster_size=4k")
	qemutest.IO(t, q, "write -P 0x11 0 1M", "write -c -P 0x22 1M 64k", "write -z 512k 64k", "write -P 0x33 4M 100k")

	for _, c := range []struct{ name, path string }{{"from-raw", raw}, {"from-qcow2", q}} {
		meta := map[string]string{"source": c.path}
		var calls atomic.Int64 // progress comes from the copy's workers
		pctx := WithProgress(ctx, func(done, total int64) { calls.Add(1) })
		v, err := importFile(pctx, s, c.name, c.path, meta)
		if err != nil {
			t.Fatalf("import %s: %v", c.path, err)
		}
		if calls.Load() == 0 {
			t.Errorf("import %s: no progress reported", c.name)
		}
		if v.Metadata["source"] != c.path || len(v.Chain) != 2 {
			t.Errorf("volume %+v", v)
		}
		want := qemutest.ConvertRaw(t, c.path)
		img, err := s.OpenHead(ctx, c.name)
		if err != nil {
			t.Fatal(err)
		}
		got := readImage(t, img)
		// qemu sees a raw file rounded up to whole sectors; so do we.
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: the imported volume (%d bytes) reads differently from the source (%d bytes)", c.name, len(got), len(want))
		}
		for _, f := range v.Chain {
			qemutest.Check(t, f)
		}
		qemutest.Compare(t, v.HeadPath, c.path)
		// A volume like any other: snapshot and delete down to nothing.
		writeHead(t, s, c.name, "write -P 0x44 0 64k")
		mustSnapshot(t, s, c.name, "s1")
		before := capture(t, s, c.name)
		if err := s.DeleteSnapshot(ctx, c.name, "s1"); err != nil {
			t.Fatal(err)
		}
		sameState(t, capture(t, s, c.name), before, "s1")
	}
	if _, err := importFile(ctx, s, "from-raw", raw, nil); !errors.Is(err, ErrExists) {
		t.Errorf("import over an existing volume: %v", err)
	}
	checkNoStrayFiles(t, s)
}

// TestImportRefused: hostile images are refused, each with a message that
// says what to do, and nothing is created.
func TestImportRefused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t)
	mustVolume(t, s, "existing", 1<<20)
	filesBefore := layerFiles(t, s)
	path := func(name string) string { return filepath.Join(dir, name) }

	qemutest.Create(t, "qcow2", path("passwd.qcow2"), "1M", "-u", "-b", "/etc/passwd", "-F", "raw")
	qemutest.Create(t, "qcow2", path("dotdot.qcow2"), "1M", "-u", "-b", "../base.qcow2", "-F", "qcow2")
	qemutest.Create(t, "qcow2", path("datafile.qcow2"), "1M", "-o", "data_file="+path("datafile.data"))
	qemutest.CreateLUKS(t, path("luks.qcow2"))
	qemutest.Create(t, "qcow2", path("huge.qcow2"), "100T")
	if err := os.WriteFile(path("empty.raw"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Truncated: the header and L1 table are there, the L2 tables and
	// data are cut off.
	qemutest.Create(t, "qcow2", path("truncated.qcow2"), "4M")
	qemutest.IO(t, path("truncated.qcow2"), "write -P 1 0 4M")
	if err := os.Truncate(path("truncated.qcow2"), 300<<10); err != nil {
		t.Fatal(err)
	}
	// A huge L1 table: 2^25 entries (256 MiB) claimed in the header.
	qemutest.Create(t, "qcow2", path("bigl1.qcow2"), "1M")
	patch(t, path("bigl1.qcow2"), 36, 1<<25)
	// Other formats, which would read as raw: their metadata would be
	// the guest's disk.
	for _, format := range []string{"vmdk", "vhdx", "vdi", "qed", "vpc", "parallels"} {
		qemutest.Create(t, format, path("foreign."+format), "1M")
	}
	luks := append([]byte("LUKS\xba\xbe\x00\x01"), make([]byte, 1<<20)...)
	if err := os.WriteFile(path("luks.raw"), luks, 0o600); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		file  string
		cause error
		says  string
	}{
		{"passwd.qcow2", qcow.ErrBacking, `backing file ("/etc/passwd"); flatten it first (qemu-img convert -O qcow2`},
		{"dotdot.qcow2", qcow.ErrBacking, `backing file ("../base.qcow2"); flatten it first`},
		{"datafile.qcow2", qcow.ErrDataFile, "external data file"},
		{"luks.qcow2", qcow.ErrEncrypted, "encrypted"},
		{"huge.qcow2", qcow.ErrLimit, "beyond the limit of 64 TiB"},
		{"empty.raw", qcow.ErrLimit, "empty"},
		{"truncated.qcow2", qcow.ErrCorrupt, "damaged or truncated"},
		{"bigl1.qcow2", nil, "import: "},
		{"foreign.vmdk", qcow.ErrForeign, "a VMDK image); convert it first (qemu-img convert -O qcow2"},
		{"foreign.vhdx", qcow.ErrForeign, "a VHDX image"},
		{"foreign.vdi", qcow.ErrForeign, "a VDI image"},
		{"foreign.qed", qcow.ErrForeign, "a QED image"},
		{"foreign.vpc", qcow.ErrForeign, "a VHD (vpc) image"},
		{"foreign.parallels", qcow.ErrForeign, "a Parallels image"},
		{"luks.raw", qcow.ErrEncrypted, "LUKS"},
	} {
		_, err := importFile(ctx, s, "new", path(c.file), nil)
		var ie *ImportError
		switch {
		case err == nil:
			t.Errorf("%s: imported", c.file)
		case !errors.As(err, &ie) || !errors.Is(err, ErrInvalid):
			t.Errorf("%s: not an ImportError wrapping ErrInvalid: %v", c.file, err)
		case c.cause != nil && !errors.Is(err, c.cause):
			t.Errorf("%s: does not wrap %v: %v", c.file, c.cause, err)
		case !strings.Contains(err.Error(), c.says):
			t.Errorf("%s: message %q does not say %q", c.file, err, c.says)
		default:
			t.Logf("%s: %v", c.file, err)
		}
		if _, err := s.Volume(ctx, "new"); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: a volume appeared: %v", c.file, err)
		}
		if files := layerFiles(t, s); !equalSets(files, filesBefore) {
			t.Errorf("%s: files left: %v", c.file, files)
		}
	}
}

// TestImportCancelled: an import cut short (an interrupted cp, ^C) leaves
// nothing.
func TestImportCancelled(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t)
	src := qemutest.Create(t, "qcow2", filepath.Join(dir, "src.qcow2"), "64M")
	qemutest.IO(t, src, "write -P 3 0 32M")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pctx := WithProgress(ctx, func(done, total int64) {
		if done > 0 {
			cancel()
		}
	})
	if _, err := importFile(pctx, s, "v", src, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled import: %v", err)
	}
	if files := layerFiles(t, s); len(files) != 0 {
		t.Errorf("files left: %v", files)
	}
	if vols, _ := s.ListVolumes(context.Background()); len(vols) != 0 {
		t.Errorf("volumes: %v", vols)
	}
}

// patch overwrites a big-endian uint32 at off of the file.
func patch(t *testing.T, path string, off int64, v uint32) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func equalSets(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[string]bool{}
	for _, x := range a {
		seen[x] = true
	}
	for _, x := range b {
		if !seen[x] {
			return false
		}
	}
	return true
}

// TestImportStaged: the store takes a staged qcow2 over as the volume's
// base layer, by a rename, unless someone still has the file open for
// writing; then, as for a staged raw file, it copies. The staged path is
// gone or left for the caller; the volume reads as the image either way.
func TestImportStaged(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	dir := t.TempDir()
	stage := func(name string) (path string, want []byte) {
		path = qemutest.Create(t, "qcow2", filepath.Join(dir, name), "4M")
		qemutest.IO(t, path, "write -P 0x5a 64k 1M")
		orig, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return path, orig
	}
	importStaged := func(name, path string) Volume {
		t.Helper()
		img, err := OpenStaged(path)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		v, err := s.ImportVolume(ctx, name, img, nil)
		if err != nil {
			t.Fatalf("import %s: %v", name, err)
		}
		if got := readImage(t, mustOpenHead(t, s, name)); !bytes.Equal(got, qemutest.ConvertRaw(t, v.Chain[1])) {
			t.Errorf("%s: the head does not read as its base layer", name)
		}
		return v
	}

	path, orig := stage("adopted.qcow2")
	want := qemutest.ConvertRaw(t, path)
	v := importStaged("adopted", path)
	if base, err := os.ReadFile(v.Chain[1]); err != nil || !bytes.Equal(base, orig) {
		t.Errorf("the base layer is not the staged file as it was: %v", err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("the staged file is still at %s: %v", path, err)
	}
	if got := readImage(t, mustOpenHead(t, s, "adopted")); !bytes.Equal(got, want) {
		t.Errorf("adopted volume reads wrong")
	}

	// Open for writing elsewhere: copied, not adopted.
	path, orig = stage("written.qcow2")
	writer, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	v = importStaged("written", path)
	writer.Close()
	if base, err := os.ReadFile(v.Chain[1]); err != nil || bytes.Equal(base, orig) {
		t.Errorf("a file open for writing was taken over: %v", err)
	}
	qemutest.Check(t, v.Chain[1])
	checkNoStrayFiles(t, s)
}

// mustOpenHead opens the head of volume name.
func mustOpenHead(t *testing.T, s *LocalStore, name string) qcow.Image {
	t.Helper()
	img, err := s.OpenHead(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// TestImportCopiesFile: a qcow2 the store can keep as it is is copied
// byte for byte, holes and all, rather than converted; one padded with
// data no table refers to is converted, so that the junk stays out of the
// store.
func TestImportCopiesFile(t *testing.T) {
	s := openStore(t)
	dir := t.TempDir()
	blocks := func(path string) int64 {
		t.Helper()
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}

	// Metadata preallocated: a 256 MiB file of which 2 MiB is data.
	sparse := qemutest.Create(t, "qcow2", filepath.Join(dir, "sparse.qcow2"), "256M", "-o", "preallocation=metadata")
	qemutest.IO(t, sparse, "write -P 0x61 1M 1M", "write -P 0x62 200M 64k")
	v, err := importFile(context.Background(), s, "sparse", sparse, nil)
	if err != nil {
		t.Fatal(err)
	}
	base := v.Chain[1]
	got, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	if want, err := os.ReadFile(sparse); err != nil || !bytes.Equal(got, want) {
		t.Errorf("the base layer is not a copy of the file: %v", err)
	}
	if b, src := blocks(base), blocks(sparse); b > src+1<<20 {
		t.Errorf("the copy holds %d bytes, the file %d: its holes were filled", b, src)
	}
	qemutest.Check(t, base)
	if !bytes.Equal(readImage(t, mustOpenHead(t, s, "sparse")), qemutest.ConvertRaw(t, sparse)) {
		t.Errorf("sparse: the volume reads differently from the file")
	}

	// 40 MiB of junk after the clusters of a 4 MiB image.
	padded := qemutest.Create(t, "qcow2", filepath.Join(dir, "padded.qcow2"), "4M")
	qemutest.IO(t, padded, "write -P 0x63 0 1M")
	f, err := os.OpenFile(padded, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(bytes.Repeat([]byte{0xa5}, 40<<20)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	v, err = importFile(context.Background(), s, "padded", padded, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := blocks(v.Chain[1]); b > 4<<20 {
		t.Errorf("the base layer of a padded file holds %d bytes: the junk was copied", b)
	}
	qemutest.Check(t, v.Chain[1])
	if !bytes.Equal(readImage(t, mustOpenHead(t, s, "padded")), qemutest.ConvertRaw(t, padded)) {
		t.Errorf("padded: the volume reads differently from the file")
	}

	// Sparse far past its clusters: 1 GiB for a 4 MiB image.
	stretched := qemutest.Create(t, "qcow2", filepath.Join(dir, "stretched.qcow2"), "4M")
	qemutest.IO(t, stretched, "write -P 0x64 0 1M")
	if err := os.Truncate(stretched, 1<<30); err != nil {
		t.Fatal(err)
	}
	v, err = importFile(context.Background(), s, "stretched", stretched, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(v.Chain[1]); err != nil {
		t.Fatal(err)
	} else if st.Size() > 8<<20 {
		t.Errorf("the base layer of a stretched file spans %d bytes: it was copied, not converted", st.Size())
	}
	if !bytes.Equal(readImage(t, mustOpenHead(t, s, "stretched")), qemutest.ConvertRaw(t, stretched)) {
		t.Errorf("stretched: the volume reads differently from the file")
	}
	checkNoStrayFiles(t, s)
}

// TestImportRefusesGarbageCompressed: a qcow2 kept as it is (copied by
// volume import, taken over from the mount's staging) is refused when a
// compressed cluster holds garbage, as its conversion would be: qemu, and
// a VM running off the volume, would fail to read that cluster. Metadata
// checks alone let it through.
func TestImportRefusesGarbageCompressed(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	dir := t.TempDir()
	filesBefore := layerFiles(t, s)
	garbage := func(name string) string {
		path := qemutest.Create(t, "qcow2", filepath.Join(dir, name), "4M")
		qemutest.IO(t, path, "write -P 0x41 0 1M", "write -c -P 0x42 2M 64k")
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// The L2 entry of 2M (cluster 32 of the first L2 table): 64 KiB
		// clusters put the host offset of a compressed cluster in bits
		// 0-53.
		be := binary.BigEndian
		l2 := be.Uint64(data[be.Uint64(data[40:]):]) & 0x00fffffffffffe00
		entry := be.Uint64(data[l2+32*8:])
		if entry&(1<<62) == 0 {
			t.Fatalf("the cluster at 2M is not compressed: %#x", entry)
		}
		host := entry & (1<<54 - 1)
		copy(data[host:], bytes.Repeat([]byte{0xff}, 64))
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := qemutest.Try(t, "qemu-img", "convert", "-O", "raw", path, filepath.Join(dir, "out.raw")); err == nil {
			t.Fatal("qemu reads the damaged cluster: not a refusal to test")
		}
		return path
	}
	refused := func(how string, err error) {
		t.Helper()
		var ie *ImportError
		if !errors.As(err, &ie) || !errors.Is(err, qcow.ErrCorrupt) || !strings.Contains(err.Error(), "compressed cluster") {
			t.Errorf("%s: got %v, want an ImportError for the compressed cluster", how, err)
		}
		if _, err := s.Volume(ctx, "new"); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: a volume appeared: %v", how, err)
		}
		if files := layerFiles(t, s); !equalSets(files, filesBefore) {
			t.Errorf("%s: files left: %v", how, files)
		}
	}

	_, err := importFile(ctx, s, "new", garbage("copied.qcow2"), nil)
	refused("volume import (copy)", err)
	img, err := OpenStaged(garbage("staged.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, err = s.ImportVolume(ctx, "new", img, nil)
	refused("staged (taken over)", err)
}
