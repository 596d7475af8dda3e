package fs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/internal/qemutest"
	"snapfs/snapshot"
)

// stagingIn makes the mount stage imports in dir, so that tests can see
// that nothing is left there.
func stagingIn(dir string) func(*Config) {
	return func(c *Config) {
		c.StagingDir = dir
	}
}

// noLeftovers fails the test if the staging dir holds anything, the store
// holds temp files, or import/ shows other than the successful imports
// (they stay a minute, for rsync).
func noLeftovers(t testing.TB, m *mounted, staging string, imported ...string) {
	t.Helper()
	// The kernel sends RELEASE after close(2) has returned: the staging
	// file of an import that ended at release (touch, a refused write) may
	// still be going away.
	left, _ := os.ReadDir(staging)
	for deadline := time.Now().Add(5 * time.Second); len(left) > 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		left, _ = os.ReadDir(staging)
	}
	if len(left) > 0 {
		t.Errorf("staging files left: %v", left)
	}
	layers, _ := os.ReadDir(filepath.Join(m.store.Dir(), "layers"))
	for _, e := range layers {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temp file left in the store: %s", e.Name())
		}
	}
	slices.Sort(imported)
	if left := readDir(t, m.path("import")); !slices.Equal(left, imported) {
		t.Errorf("import/ shows %v, want %v", left, imported)
	}
}

// run runs a command and returns its combined output and error.
func run(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// checkImported fails the test unless volumes/name reads as the image src.
func checkImported(t testing.TB, m *mounted, name, src string) {
	t.Helper()
	head := m.path("volumes", name, "head.raw")
	if _, err := os.Stat(head); err != nil {
		t.Fatalf("volume %s after import: %v", name, err)
	}
	sameContent(t, head, qemutest.ConvertRawFile(t, src))
}

func TestImport(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	newVolume(t, store, "taken", 1<<20)
	m := testMount(t, store, stagingIn(staging))
	dir := t.TempDir()
	imp := func(name string) string { return m.path("import", name) }

	// A qcow2 image with data, zero clusters and compressed clusters.
	src := qemutest.Create(t, "qcow2", filepath.Join(dir, "src.qcow2"), "16M")
	qemutest.IO(t, src, "write -P 0x41 0 3M", "write -z 1M 64k", "write -c -P 0x42 8M 128k")
	if out, err := run("cp", src, imp("fromqcow2")); err != nil {
		t.Fatalf("cp qcow2: %v: %s", err, out)
	}
	checkImported(t, m, "fromqcow2", src)

	// A sparse raw file, copied sparsely.
	raw := qemutest.ConvertRawFile(t, src)
	if out, err := run("cp", "--sparse=always", raw, imp("fromraw")); err != nil {
		t.Fatalf("cp raw: %v: %s", err, out)
	}
	checkImported(t, m, "fromraw", raw)

	// The format comes from the content: a qcow2 named .raw is a qcow2.
	if out, err := run("cp", src, imp("named.raw")); err != nil {
		t.Fatalf("cp qcow2 as .raw: %v: %s", err, out)
	}
	checkImported(t, m, "named.raw", src)

	// A shell redirection: the shell opens, dup2s and closes the first
	// descriptor before cat writes; cat's exit closes the file.
	if out, err := run("sh", "-c", "cat "+src+" > "+imp("redirected")); err != nil {
		t.Fatalf("cat >: %v: %s", err, out)
	}
	checkImported(t, m, "redirected", src)

	// dd starting at an offset, and rsync --inplace.
	if out, err := run("dd", "if="+raw, "of="+imp("dd"), "bs=64k", "skip=16", "seek=16", "status=none"); err != nil {
		t.Fatalf("dd: %v: %s", err, out)
	}
	ddRef := filepath.Join(dir, "dd.raw")
	if out, err := run("dd", "if="+raw, "of="+ddRef, "bs=64k", "skip=16", "seek=16", "status=none"); err != nil {
		t.Fatalf("dd: %v: %s", err, out)
	}
	checkImported(t, m, "dd", ddRef)
	if out, err := run("rsync", "--inplace", "-S", src, imp("rsync")); err != nil {
		t.Fatalf("rsync: %v: %s", err, out)
	}
	checkImported(t, m, "rsync", src)

	// Writes out of order, in one open.
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(imp("backwards"), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 64 << 10
	for off := (len(data) - 1) / chunk * chunk; off >= 0; off -= chunk {
		if _, err := f.WriteAt(data[off:min(off+chunk, len(data))], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close after writing backwards: %v", err)
	}
	checkImported(t, m, "backwards", src)

	// Nothing written: nothing imported, and no error.
	if out, err := run("touch", imp("empty")); err != nil {
		t.Fatalf("touch: %v: %s", err, out)
	}
	if _, err := os.Stat(m.path("volumes", "empty")); !os.IsNotExist(err) {
		t.Errorf("touch made a volume: %v", err)
	}

	// A name that is taken, a name that is not valid.
	mustFail(t, "create import/taken", os.WriteFile(imp("taken"), data, 0o600), syscall.EEXIST)
	mustFail(t, "create import/.hidden", os.WriteFile(imp(".hidden"), data, 0o600), syscall.EINVAL)
	mustFail(t, "create import/a@b", os.WriteFile(imp("a@b"), data, 0o600), syscall.EINVAL)

	// A finished import stays in import/ for a while, read-only, with
	// its size: rsync stats it after closing it.
	st, err := os.Stat(imp("backwards"))
	if err != nil || st.Size() != int64(len(data)) {
		t.Errorf("import/backwards after the import: %v, %v", st, err)
	}
	mustFail(t, "reopen a finished import", os.WriteFile(imp("backwards"), data, 0o600), syscall.EEXIST)
	if out, err := run("cp", src, imp("backwards")); err == nil || !strings.Contains(out, "File exists") {
		t.Errorf("cp over a finished import: %v: %s; want File exists", err, out)
	}
	if err := os.Remove(imp("backwards")); err != nil {
		t.Errorf("rm of a finished import: %v", err)
	}
	noLeftovers(t, m, staging, "dd", "fromqcow2", "fromraw", "named.raw", "redirected", "rsync")

	// df of the mount is the filesystem imports go to.
	var mnt, stage syscall.Statfs_t
	if err := syscall.Statfs(m.dir, &mnt); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Statfs(staging, &stage); err != nil {
		t.Fatal(err)
	}
	if mnt.Blocks != stage.Blocks || mnt.Bsize != stage.Bsize {
		t.Errorf("statfs of the mount: %d blocks of %d, want the staging filesystem's %d of %d", mnt.Blocks, mnt.Bsize, stage.Blocks, stage.Bsize)
	}
}

// TestImportRefused: every hostile image is refused from close(), cp
// says so, the log says why, and nothing is created or left behind.
func TestImportRefused(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }

	qemutest.Create(t, "qcow2", path("passwd.qcow2"), "1M", "-u", "-b", "/etc/passwd", "-F", "raw")
	qemutest.Create(t, "qcow2", path("dotdot.qcow2"), "1M", "-u", "-b", "../base.qcow2", "-F", "qcow2")
	qemutest.Create(t, "qcow2", path("datafile.qcow2"), "1M", "-o", "data_file="+path("datafile.data"))
	qemutest.CreateLUKS(t, path("luks.qcow2"))
	qemutest.Create(t, "qcow2", path("truncated.qcow2"), "4M")
	qemutest.IO(t, path("truncated.qcow2"), "write -P 1 0 4M")
	if err := os.Truncate(path("truncated.qcow2"), 300<<10); err != nil {
		t.Fatal(err)
	}
	// A header claiming an L1 table of 2^25 entries (256 MiB).
	qemutest.Create(t, "qcow2", path("bigl1.qcow2"), "1M")
	patchBE32(t, path("bigl1.qcow2"), 36, 1<<25)
	qemutest.Create(t, "qcow2", path("huge.qcow2"), "100T")

	for _, c := range []struct{ file, says string }{
		{"passwd.qcow2", `backing file ("/etc/passwd"); flatten it first`},
		{"dotdot.qcow2", `backing file ("../base.qcow2"); flatten it first`},
		{"datafile.qcow2", "external data file"},
		{"luks.qcow2", "encrypted"},
		{"truncated.qcow2", "damaged or truncated"},
		{"bigl1.qcow2", "import: "},
		{"huge.qcow2", "beyond the limit"},
	} {
		name := strings.TrimSuffix(c.file, ".qcow2")
		out, err := run("cp", path(c.file), m.path("import", name))
		if err == nil {
			t.Errorf("cp %s: succeeded", c.file)
		} else if !strings.Contains(out, "Invalid argument") {
			t.Errorf("cp %s: %q, want Invalid argument", c.file, out)
		}
		logged := lines(m.log.String(), "import "+name+" failed")
		if len(logged) != 1 || !strings.Contains(logged[0], c.says) {
			t.Errorf("%s: log %q does not say %q", c.file, logged, c.says)
		}
		if _, err := os.Stat(m.path("volumes", name)); !os.IsNotExist(err) {
			t.Errorf("%s: volumes/%s exists: %v", c.file, name, err)
		}
		t.Logf("%s: cp says %q; log: %s", c.file, strings.TrimSpace(out), logged)
	}
	if vols, _ := store.ListVolumes(t.Context()); len(vols) != 0 {
		t.Errorf("volumes after refused imports: %v", vols)
	}
	noLeftovers(t, m, staging)
}

// patchBE32 writes a big-endian uint32 at off in a file.
func patchBE32(t testing.TB, path string, off int64, v uint32) {
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

// TestImportInterrupted: a cp interrupted (^C, kill, kill -9) before it
// closes the file imports nothing. cp reads from a FIFO that the test
// feeds, so that it is surely in the middle of the copy when it is hit.
func TestImportInterrupted(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGKILL} {
		name := fmt.Sprintf("sig%d", int(sig))
		fifo := filepath.Join(t.TempDir(), "fifo")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		cp := exec.Command("cp", fifo, m.path("import", name))
		var stderr bytes.Buffer
		cp.Stderr = &stderr
		if err := cp.Start(); err != nil {
			t.Fatal(err)
		}
		feed, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := feed.Write(make([]byte, 4<<20)); err != nil {
			t.Fatal(err)
		}
		// Wait until cp has written it all to the import.
		deadline := time.Now().Add(10 * time.Second)
		for {
			st, err := os.Stat(m.path("import", name))
			if err == nil && st.Size() == 4<<20 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cp did not write: %v %s", err, stderr.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
		cp.Process.Signal(sig)
		err = cp.Wait()
		feed.Close()
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			t.Fatalf("cp after %v: %v", sig, err)
		}
		if _, err := os.Stat(m.path("volumes", name)); !os.IsNotExist(err) {
			t.Errorf("volumes/%s after cp got %v: %v", name, sig, err)
		}
		logged := lines(m.log.String(), "import "+name+" failed")
		if len(logged) != 1 || !strings.Contains(logged[0], "abandoned") {
			t.Errorf("log after %v: %q", sig, logged)
		}
	}
	noLeftovers(t, m, staging)
	if vols, _ := store.ListVolumes(t.Context()); len(vols) != 0 {
		t.Errorf("volumes after interrupted imports: %v", vols)
	}
}

// baseLayer returns the file of the bottom layer of volume name.
func baseLayer(t testing.TB, m *mounted, name string) string {
	t.Helper()
	v, err := m.store.Volume(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	return v.Chain[len(v.Chain)-1]
}

// TestImportAdopts: a qcow2 copied into import/ becomes the volume's base
// layer as it is, by a rename, with no second copy; what the store cannot
// keep as it is (raw, a qcow2 with internal snapshots, one marked dirty) is
// copied. Either way the volume reads as the image, qemu-img check passes
// on its chain, and nothing is left in the staging directory.
func TestImportAdopts(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }

	// Compressed clusters and 4 KiB clusters: the store reads any qcow2.
	qemutest.Create(t, "qcow2", path("plain.qcow2"), "16M", "-o", "cluster_size=4096")
	qemutest.IO(t, path("plain.qcow2"), "write -P 0x41 0 3M", "write -c -P 0x42 8M 128k", "write -z 1M 64k")
	qemutest.Create(t, "qcow2", path("snapshots.qcow2"), "16M")
	qemutest.IO(t, path("snapshots.qcow2"), "write -P 0x43 0 1M")
	qemutest.Img(t, "snapshot", "-c", "internal", path("snapshots.qcow2"))
	qemutest.Create(t, "qcow2", path("dirty.qcow2"), "16M", "-o", "lazy_refcounts=on")
	qemutest.IO(t, path("dirty.qcow2"), "write -P 0x44 0 1M")
	setIncompatible(t, path("dirty.qcow2"), 1) // the dirty bit
	raw := qemutest.ConvertRawFile(t, path("plain.qcow2"))

	for _, c := range []struct {
		file    string
		adopted bool
	}{{"plain.qcow2", true}, {"snapshots.qcow2", false}, {"dirty.qcow2", false}, {raw, false}} {
		src := c.file
		if !filepath.IsAbs(src) {
			src = path(c.file)
		}
		name := strings.TrimSuffix(filepath.Base(c.file), ".qcow2")
		if out, err := run("cp", src, m.path("import", name)); err != nil {
			t.Fatalf("cp %s: %v: %s", c.file, err, out)
		}
		checkImported(t, m, name, src)
		head, base := m.path("volumes", name, "head.raw"), baseLayer(t, m, name)
		v, err := store.Volume(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		qemutest.Check(t, v.HeadPath)
		qemutest.Check(t, base)
		qemutest.Compare(t, v.HeadPath, head)
		same := compareFiles(src, base) == nil
		if same != c.adopted {
			t.Errorf("%s: base layer is the image as it is: %v, want %v", c.file, same, c.adopted)
		}
		if st, err := os.Stat(base); err != nil || st.Mode().Perm() != 0o400 {
			t.Errorf("%s: base layer %s: %v, %v; want mode 0400", c.file, base, st.Mode(), err)
		}
	}
	noLeftovers(t, m, staging, "dirty", "plain", "snapshots", filepath.Base(raw))
}

// setIncompatible sets bits in the incompatible features of a qcow2 v3.
func setIncompatible(t testing.TB, path string, bits uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], 72); err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint64(b[:], binary.BigEndian.Uint64(b[:])|bits)
	if _, err := f.WriteAt(b[:], 72); err != nil {
		t.Fatal(err)
	}
}

// TestImportStagingElsewhere: with the staging directory on another
// filesystem than the store (/dev/shm, a tmpfs), the store cannot take
// the staged file over, and copies it.
func TestImportStagingElsewhere(t *testing.T) {
	staging, err := os.MkdirTemp("/dev/shm", "snapfs-staging-")
	if err != nil {
		t.Fatalf("a staging directory on tmpfs: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(staging) })
	store := newStore(t)
	var a, b syscall.Statfs_t
	if syscall.Statfs(staging, &a) != nil || syscall.Statfs(store.Dir(), &b) != nil || a.Fsid == b.Fsid {
		t.Fatalf("%s and %s are on one filesystem", staging, store.Dir())
	}
	m := testMount(t, store, stagingIn(staging))
	src := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "src.qcow2"), "8M")
	qemutest.IO(t, src, "write -P 0x45 1M 2M")
	if out, err := run("cp", src, m.path("import", "copied")); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	checkImported(t, m, "copied", src)
	if compareFiles(src, baseLayer(t, m, "copied")) == nil {
		t.Errorf("the base layer is the staged file, across filesystems")
	}
	noLeftovers(t, m, staging, "copied")
}

// TestCrashImportAdopting: kill -9 after a staged qcow2 was checked and
// before the store moved it in leaves no volume, and the staging file is
// swept at the next mount (crash checks both directories).
func TestCrashImportAdopting(t *testing.T) {
	src := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "src.qcow2"), "64M")
	qemutest.IO(t, src, "write -P 0x52 0 32M")
	w := newCrashWorld(t)
	cp := func(mnt string) error {
		out, err := exec.Command("cp", src, filepath.Join(mnt, "import/new")).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	crash(t, w, snapshot.PauseImportAdopting, cp, "volumes/new/head.raw", qemutest.ConvertRawFile(t, src))
	if _, err := os.Stat(filepath.Join(w.cfg.Mountpoint, "volumes/new")); !os.IsNotExist(err) {
		t.Errorf("volumes/new after an import killed before its commit: %v", err)
	}
	if err := cp(w.cfg.Mountpoint); err != nil {
		t.Fatalf("import after restart: %v", err)
	}
	sameContent(t, filepath.Join(w.cfg.Mountpoint, "volumes/new/head.raw"), qemutest.ConvertRawFile(t, src))
}
