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
	if left, _ := os.ReadDir(staging); len(left) > 0 {
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
	mustFail(t, "reopen a finished import", os.WriteFile(imp("backwards"), data, 0o600), syscall.EBADF)
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
	qemutest.Create(t, "qcow2", path("luks.qcow2"), "1M", "--object", "secret,id=sec0,data=123456",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
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
