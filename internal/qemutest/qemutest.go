// Package qemutest runs the real qemu tools, qemu-img and qemu-io, from Go
// tests: to make images with every qcow2 feature, and as the oracle that our
// own reading and writing is compared against.
//
// Every helper takes the test and fails it (t.Fatal) with the tool's stderr
// when the tool fails. A missing tool fails the test too, never skips it:
// `make test` installs qemu-utils, and a test that silently skips where CI
// runs is a test that asserts nothing.
package qemutest

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Run runs a qemu tool (qemu-img, qemu-io, ...) with args and returns its
// stdout, failing the test with its stderr if it exits non-zero.
func Run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	out, err := Try(t, tool, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Try runs a qemu tool like Run but returns its failure, a *ToolError,
// instead of failing the test: for tests that expect qemu to refuse
// something (qemu-img check exits non-zero on a corrupt image). A missing
// tool still fails the test.
func Try(t testing.TB, tool string, args ...string) (string, error) {
	t.Helper()
	path, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s not found (%v): install qemu-utils (make test does)", tool, err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), &ToolError{
			Command: tool + " " + strings.Join(args, " "),
			Stdout:  stdout.String(),
			Stderr:  stderr.String(),
			Err:     err,
		}
	}
	return stdout.String(), nil
}

// ToolError is how a qemu tool failed.
type ToolError struct {
	// Command is the command line, for messages.
	Command string
	// Stdout and Stderr are everything the tool printed.
	Stdout, Stderr string
	// Err is the *exec.ExitError (or the error starting the tool).
	Err error
}

// Error quotes the command and everything it printed: qemu-io reports
// failed commands on stdout, qemu-img on stderr.
func (e *ToolError) Error() string {
	return e.Command + ": " + e.Err.Error() + "\nstderr: " + e.Stderr + "\nstdout: " + e.Stdout
}

// Unwrap returns the *exec.ExitError.
func (e *ToolError) Unwrap() error { return e.Err }

// Img runs qemu-img with args and returns its stdout.
func Img(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, "qemu-img", args...)
}

// Create runs `qemu-img create -f format [opts...] path size` and returns
// path. opts are passed as they are, e.g. "-o", "cluster_size=4k". qemu
// splits -o values at commas, so a path inside them (data_file=...) must
// have none: t.TempDir() names contain the test name.
func Create(t testing.TB, format, path, size string, opts ...string) string {
	t.Helper()
	args := append([]string{"create", "-q", "-f", format}, opts...)
	Img(t, append(args, path, size)...)
	return path
}

// CreateLUKS creates a 1 MiB qcow2 image encrypted with LUKS at path (the
// secret is "hunter2") and returns path. The key derivation is made cheap
// (iter-time 10 ms). qemu-img first times the key derivation on this CPU,
// and on a loaded machine that timing can fail ("Unable to get accurate CPU
// usage"): that failure is retried, any other fails the test.
func CreateLUKS(t testing.TB, path string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "1M"}
	for try := 1; ; try++ {
		_, err := Try(t, "qemu-img", args...)
		var te *ToolError
		if err == nil {
			return path
		}
		if try == 5 || !errors.As(err, &te) || !strings.Contains(te.Stderr, "accurate CPU usage") {
			t.Fatal(err)
		}
		os.Remove(path)
	}
}

// IO runs qemu-io commands (e.g. "write -P 1 0 64k") on image, in one
// process and in order, and returns its stdout. qemu-io probes the format.
// A failed command fails the test (qemu-io exits non-zero).
func IO(t testing.TB, image string, cmds ...string) string {
	t.Helper()
	return Run(t, "qemu-io", ioArgs(image, cmds)...)
}

// IOCrash runs qemu-io commands on image and then kills qemu-io with
// SIGKILL ("sigraise 9"), so that nothing is flushed or cleaned up: with
// lazy refcounts the image keeps its dirty bit, as after a host crash.
func IOCrash(t testing.TB, image string, cmds ...string) {
	t.Helper()
	_, err := Try(t, "qemu-io", ioArgs(image, append(cmds, "sigraise 9"))...)
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("qemu-io on %s was not killed by sigraise 9: %v", image, err)
	}
	if ws, ok := exit.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("qemu-io on %s did not die of SIGKILL: %v", image, err)
	}
}

func ioArgs(image string, cmds []string) []string {
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return append(args, image)
}

// ConvertRawFile flattens image (with its backing chain) with `qemu-img
// convert -O raw` into a new file in a temporary directory and returns its
// path: what every reader of the image must see.
func ConvertRawFile(t testing.TB, image string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(image)+".raw")
	Img(t, "convert", "-O", "raw", image, out)
	return out
}

// ConvertRaw is ConvertRawFile, read into memory; for small images.
func ConvertRaw(t testing.TB, image string) []byte {
	t.Helper()
	data, err := os.ReadFile(ConvertRawFile(t, image))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// MapEntry is one entry of `qemu-img map --output=json`.
type MapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	// Depth is the index in the chain of the layer that answered (0 is the
	// top). For ranges not present in any layer it is not meaningful.
	Depth int `json:"depth"`
	// Present: some layer of the chain allocates the range (data or zero
	// clusters).
	Present bool `json:"present"`
	// Zero: the range reads as zeros (this includes data clusters that qemu
	// knows to be holes in the host file).
	Zero bool `json:"zero"`
	// Data: the range is stored as data.
	Data bool `json:"data"`
	// Offset is the host offset of data, when it has one (not for
	// compressed clusters).
	Offset *int64 `json:"offset,omitempty"`
}

// End returns the offset just past the entry.
func (e MapEntry) End() int64 { return e.Start + e.Length }

// Map returns `qemu-img map --output=json image`.
func Map(t testing.TB, image string) []MapEntry {
	t.Helper()
	var m []MapEntry
	if err := json.Unmarshal([]byte(Img(t, "map", "--output=json", image)), &m); err != nil {
		t.Fatalf("qemu-img map %s: %v", image, err)
	}
	return m
}

// CheckResult is the output of `qemu-img check --output=json`.
type CheckResult struct {
	Corruptions       int   `json:"corruptions"`
	Leaks             int   `json:"leaks"`
	CheckErrors       int   `json:"check-errors"`
	AllocatedClusters int64 `json:"allocated-clusters"`
	TotalClusters     int64 `json:"total-clusters"`
	ImageEndOffset    int64 `json:"image-end-offset"`
}

// Check runs `qemu-img check` on image and fails the test if qemu finds any
// corruption, leak or error. It returns the report.
func Check(t testing.TB, image string) CheckResult {
	t.Helper()
	// qemu-img check exits 2 for corruptions and 3 for leaks, with the JSON
	// report on stdout still: parse it whatever the exit code.
	out, err := Try(t, "qemu-img", "check", "--output=json", image)
	var r CheckResult
	if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
		t.Fatalf("qemu-img check %s: %v (output not JSON: %v)", image, err, jerr)
	}
	if err != nil || r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check %s: %d corruptions, %d leaks, %d errors: %v", image, r.Corruptions, r.Leaks, r.CheckErrors, err)
	}
	return r
}

// Compare runs `qemu-img compare a b` and fails the test unless qemu finds
// the two images' contents identical (formats are probed; a shorter image
// must read as zeros past its end).
func Compare(t testing.TB, a, b string) {
	t.Helper()
	if _, err := Try(t, "qemu-img", "compare", a, b); err != nil {
		t.Fatalf("qemu-img compare: images differ: %v", err)
	}
}

// Info is a part of `qemu-img info --output=json`.
type Info struct {
	Format          string         `json:"format"`
	VirtualSize     int64          `json:"virtual-size"`
	ClusterSize     int64          `json:"cluster-size"`
	BackingFilename string         `json:"backing-filename"`
	BackingFormat   string         `json:"backing-filename-format"`
	DirtyFlag       bool           `json:"dirty-flag"`
	Snapshots       []SnapshotInfo `json:"snapshots"`
	FormatSpecific  struct {
		Type string `json:"type"`
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    int    `json:"refcount-bits"`
			Corrupt         bool   `json:"corrupt"`
			ExtendedL2      bool   `json:"extended-l2"`
			DataFile        string `json:"data-file"`
		} `json:"data"`
	} `json:"format-specific"`
}

// SnapshotInfo is one internal snapshot in `qemu-img info --output=json`.
type SnapshotInfo struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
}

// ImgInfo returns `qemu-img info --output=json image`.
func ImgInfo(t testing.TB, image string) Info {
	t.Helper()
	var info Info
	if err := json.Unmarshal([]byte(Img(t, "info", "--output=json", image)), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v", image, err)
	}
	return info
}

// ImgInfoChain returns `qemu-img info --backing-chain --output=json image`:
// one Info per layer, the top first.
func ImgInfoChain(t testing.TB, image string) []Info {
	t.Helper()
	var chain []Info
	if err := json.Unmarshal([]byte(Img(t, "info", "--backing-chain", "--output=json", image)), &chain); err != nil {
		t.Fatalf("qemu-img info --backing-chain %s: %v", image, err)
	}
	return chain
}
