package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// snapfsBin is the snapfs binary under test, built once by TestMain: the
// tests run the real command, as a user or a script would.
var snapfsBin string

// The binary under test is built without cgo, unless this test binary was
// built with the Ceph backend (mount_ceph_test.go), which needs it too.
var binaryTags, binaryCgo = "", "0"

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "snapfs-cli-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	snapfsBin = filepath.Join(dir, "snapfs")
	build := exec.Command("go", "build", "-tags", binaryTags, "-o", snapfsBin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED="+binaryCgo)
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building snapfs: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is what one run of the binary did.
type result struct {
	stdout, stderr string
	code           int
}

// runSnapfs runs the snapfs binary with args, with no stdin and stderr not a
// terminal (so no progress bar), and returns what it printed and its exit
// status. It fails the test only if the binary cannot be run at all.
func runSnapfs(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, snapfsBin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("running snapfs %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// mustSucceed runs snapfs and fails the test unless it exits 0 with nothing
// on stderr.
func mustSucceed(t *testing.T, args ...string) string {
	t.Helper()
	r := runSnapfs(t, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("snapfs %s: exit %d, stderr %q", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// mustFailWith runs snapfs and checks the failure contract: exit status 1,
// nothing on stdout, and exactly one line on stderr that starts with
// "snapfs: " and contains every string of want (the file it is about, the
// problem). It returns that line.
func mustFailWith(t *testing.T, args []string, want ...string) string {
	t.Helper()
	r := runSnapfs(t, args...)
	if r.code != 1 {
		t.Fatalf("snapfs %s: exit %d, want 1 (stderr %q)", strings.Join(args, " "), r.code, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("snapfs %s: printed %q on stdout while failing", strings.Join(args, " "), r.stdout)
	}
	line, ok := strings.CutSuffix(r.stderr, "\n")
	if !ok || strings.Contains(line, "\n") || !strings.HasPrefix(line, "snapfs: ") {
		t.Fatalf("snapfs %s: stderr is not one line starting with \"snapfs: \": %q", strings.Join(args, " "), r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(line, w) {
			t.Errorf("snapfs %s: error line %q does not mention %q", strings.Join(args, " "), line, w)
		}
	}
	return line
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"info"}, []string{"usage: snapfs info [--json] IMAGE"}},
		{[]string{"info", "a", "b"}, []string{"usage: snapfs info"}},
		{[]string{"convert", "only-src"}, []string{"usage: snapfs convert", "SRC DST"}},
		{[]string{"info", "--no-such-flag", "x"}, []string{"--no-such-flag"}},
		{[]string{"no-such-command"}, []string{"no-such-command"}},
		{[]string{"convert", "-O", "vmdk", "a", "b"}, []string{"vmdk", "raw or qcow2"}},
		{[]string{"convert", "-c", "zstd", "a", "b"}, []string{"-c needs -O qcow2"}},
		{[]string{"convert", "-O", "qcow2", "-c", "lz4", "a", "b"}, []string{"lz4"}},
		{[]string{"convert", "-B", "base", "a", "b"}, []string{"-B needs -O qcow2"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			mustFailWith(t, tc.args, tc.want...)
		})
	}
}

func TestHelp(t *testing.T) {
	out := mustSucceed(t, "--help")
	for _, cmd := range []string{"info", "convert"} {
		if !strings.Contains(out, cmd) {
			t.Errorf("snapfs --help does not list %q:\n%s", cmd, out)
		}
	}
}

func TestErrorLine(t *testing.T) {
	_, statErr := os.Stat("/nonexistent/x.qcow2")
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"plain", errors.New("bad thing"), "snapfs: bad thing"},
		{"file", inFile("a.qcow2", errors.New("corrupt")), "snapfs: a.qcow2: corrupt"},
		// The path of an os error about the same file is not repeated.
		{"path error", inFile("/nonexistent/x.qcow2", statErr), "snapfs: /nonexistent/x.qcow2: stat: no such file or directory"},
		{"relative path error", inFile("x.qcow2", &os.PathError{Op: "open", Path: mustAbs(t, "x.qcow2"), Err: fs.ErrNotExist}), "snapfs: x.qcow2: open: file does not exist"},
		{"other path error", inFile("top.qcow2", &os.PathError{Op: "read", Path: "/base.qcow2", Err: fs.ErrClosed}), "snapfs: top.qcow2: read /base.qcow2: file already closed"},
		// A problem already tied to a file keeps its file.
		{"nested", inFile("outer", inFile("inner", errors.New("p"))), "snapfs: inner: p"},
		{"newlines folded", errors.New("line one\nline two"), "snapfs: line one; line two"},
		{"escapes defused", errors.New("backing \x1b[2Jfile\r\x07"), "snapfs: backing ?[2Jfile ?"},
		{"interrupted", inFile("out.raw", fmt.Errorf("copy: %w", context.Canceled)), "snapfs: out.raw: interrupted"},
		// The model's sentinels lose their package prefix, which reads
		// as a subject on the command line; others keep theirs.
		{"model sentinel", fmt.Errorf("%w: volume %q", snapshot.ErrExists, "v1"), `snapfs: already exists: volume "v1"`},
		{"model sentinel in a file", inFile("x.img", fmt.Errorf("%w: too big", snapshot.ErrInvalid)), "snapfs: x.img: invalid argument: too big"},
		{"two model sentinels", fmt.Errorf("%w: %w: a/b", snapshot.ErrInvalid, snapshot.ErrInvalidName), "snapfs: invalid argument: invalid name: a/b"},
		{"a snapshot named in the message", fmt.Errorf("%w: snapshot %q", snapshot.ErrNotFound, "snapshot: x"), `snapfs: not found: snapshot "snapshot: x"`},
		{"qcow sentinel", inFile("a.qcow2", fmt.Errorf("%w: L1 table", qcow.ErrCorrupt)), "snapfs: a.qcow2: qcow: corrupt image: L1 table"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := errorLine(tc.err); got != tc.want {
				t.Errorf("errorLine = %q, want %q", got, tc.want)
			}
		})
	}
	// The problem stays reachable for errors.Is through the file wrapper.
	if err := inFile("x", statErr); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("inFile hides fs.ErrNotExist: %v", err)
	}
	if inFile("x", nil) != nil {
		t.Error("inFile(nil) is not nil")
	}
}

// TestModelErrorLine: the model's errors, from the binary, read without
// the package prefix of their sentinel.
func TestModelErrorLine(t *testing.T) {
	st := "--store=" + filepath.Join(t.TempDir(), "store")
	mustSucceed(t, "volume", "create", st, "v1", "1M")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"volume", "create", st, "v1", "1M"}, `snapfs: already exists: volume "v1"`},
		{[]string{"volume", "create", st, "a/b", "1M"}, `snapfs: invalid name: volume name "a/b" contains '/'`},
		{[]string{"snapshot", "create", st, "nope@s"}, `snapfs: not found: volume "nope"`},
	} {
		if line := mustFailWith(t, tc.args); line != tc.want {
			t.Errorf("snapfs %s: %q, want %q", strings.Join(tc.args, " "), line, tc.want)
		}
	}
}

func mustAbs(t *testing.T, path string) string {
	t.Helper()
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}
