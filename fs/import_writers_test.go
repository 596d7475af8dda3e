package fs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestImportSecondWriter: a second cp to import/NAME while the first is
// still writing it (open with O_TRUNC) is refused with EBUSY, and the
// first import goes on and imports its image untouched; it is not mixed
// with the second's and imported as neither, both cps saying success.
func TestImportSecondWriter(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	dir := t.TempDir()
	first := bytes.Repeat([]byte{0xa1}, 2<<20)
	imp := m.path("import", "dup")

	f, err := os.OpenFile(imp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(first[:1<<20]); err != nil {
		t.Fatal(err)
	}
	// What cp does to a file that exists: open with O_TRUNC.
	_, err = os.OpenFile(imp, os.O_WRONLY|os.O_TRUNC, 0o600)
	mustFail(t, "open O_TRUNC of an import being written", err, syscall.EBUSY)
	// And a real cp, from another process (whose exec closes the
	// test's descriptor, close-on-exec, in the child: see closeOwners).
	second := filepath.Join(dir, "second.raw")
	if err := os.WriteFile(second, bytes.Repeat([]byte{0xb2}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", second, imp).CombinedOutput(); err == nil {
		t.Fatalf("a second cp to an import being written succeeded: %s", out)
	} else if !strings.Contains(string(out), "busy") {
		t.Fatalf("cp: %v: %s; want it to say the file is busy", err, out)
	}
	if _, err := f.Write(first[1<<20:]); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close of the first writer: %v", err)
	}
	checkImportedBytes(t, m, staging, "dup", first)
}

// checkImportedBytes checks that volumes/name reads as want, and that the
// import left nothing behind.
func checkImportedBytes(t *testing.T, m *mounted, staging, name string, want []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".raw")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	checkImported(t, m, name, path)
	noLeftovers(t, m, staging, name)
}

// TestImportForkedChildren: a writer of import/NAME that starts programs
// while it writes (its children get a copy of its descriptor, and close it
// when they exec or exit) imports once, when it closes the file itself,
// and the volume holds all it wrote. Each close of a child sends a FLUSH:
// one from an exec used to hang the whole mount, and one from an exit
// imported the half written so far.
func TestImportForkedChildren(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	want := append(bytes.Repeat([]byte{0x11}, 1<<20), bytes.Repeat([]byte{0x22}, 1<<20)...)
	imp := m.path("import", "kids")

	f, err := os.OpenFile(imp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(want[:1<<20]); err != nil {
		t.Fatal(err)
	}
	// The child's exec closes its copy (close-on-exec).
	if out, err := exec.Command("true").CombinedOutput(); err != nil {
		t.Fatalf("true: %v: %s", err, out)
	}
	// This child keeps its copy through the exec, and closes it on exit.
	child := exec.Command("true")
	child.ExtraFiles = []*os.File{f}
	if out, err := child.CombinedOutput(); err != nil {
		t.Fatalf("true with the file: %v: %s", err, out)
	}
	if _, err := os.Stat(m.path("volumes", "kids")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("volumes/kids before the writer closed import/kids: %v", err)
	}
	if _, err := f.Write(want[1<<20:]); err != nil {
		t.Fatalf("write after the children closed their copies: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	checkImportedBytes(t, m, staging, "kids", want)
}

// TestImportWriterExecs: a writer that execs another program with
// import/NAME open close-on-exec ends its writing there, and the import
// happens. The FLUSH comes from inside execve, while /proc/PID/stat of
// the writer waits for the exec: reading it used to hang the mount.
func TestImportWriterExecs(t *testing.T) {
	staging := t.TempDir()
	store := newStore(t)
	m := testMount(t, store, stagingIn(staging))
	imp := m.path("import", "execd")
	script := `import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
os.write(fd, b"\x33" * (1 << 20))
os.execv("/bin/true", ["true"])
`
	if out, err := exec.Command("python3", "-c", script, imp).CombinedOutput(); err != nil {
		t.Fatalf("python3: %v: %s", err, out)
	}
	checkImportedBytes(t, m, staging, "execd", bytes.Repeat([]byte{0x33}, 1<<20))
}
