// Package images makes the disk images the benchmarks run on, with the
// real qemu tools (qemu-img, qemu-io), and lets a later run reuse them: a
// 2 GiB chain takes longer to make than to measure.
package images

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Chunk bounds one qemu-io write: qemu-io holds the whole buffer in memory.
const Chunk = 64 << 20

// WritePattern writes a pattern file for qemu-io's write -s into dir and
// returns its path: 1 MiB and a bit (so that clusters differ from each
// other) of data that compresses about as well as a real disk does, half
// random bytes and half text. Different seeds give different data.
func WritePattern(dir, name string, seed uint64) (string, error) {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	words := strings.Fields("the of and to in is was for on that with as by at from qcow2 snapshot volume cluster layer image disk block")
	var buf bytes.Buffer
	for buf.Len() < 1<<20+4096+int(seed)*512 {
		for i := 0; i < 256; i++ {
			buf.WriteByte(byte(rng.Uint32()))
		}
		for n := 0; n < 256; {
			w := words[rng.IntN(len(words))] + " "
			buf.WriteString(w)
			n += len(w)
		}
	}
	path := filepath.Join(dir, name)
	return path, os.WriteFile(path, buf.Bytes(), 0o644)
}

// Write is one run of guest bytes to fill with a pattern file.
type Write struct {
	Pattern  string // a file from WritePattern
	Off, Len int64
}

// WriteRanges does the writes to the qcow2 image img in one qemu-io run,
// chunk by chunk, each chunk starting at the beginning of its pattern.
// qemu-io runs in dir, so relative paths are taken from there.
func WriteRanges(dir, img string, writes ...Write) error {
	args := []string{"-f", "qcow2"}
	for _, w := range writes {
		for pos := w.Off; pos < w.Off+w.Len; pos += Chunk {
			args = append(args, "-c", fmt.Sprintf("write -q -s %s %d %d", w.Pattern, pos, min(Chunk, w.Off+w.Len-pos)))
		}
	}
	return Tool(dir, "qemu-io", append(args, img)...)
}

// WriteRange fills [off, off+length) of img with the pattern file.
func WriteRange(dir, img, pattern string, off, length int64) error {
	return WriteRanges(dir, img, Write{pattern, off, length})
}

// Tool runs a program (a qemu tool, snapfs) in dir; its error carries the
// program's output.
func Tool(dir, name string, args ...string) error {
	_, err := Output(dir, name, args...)
	return err
}

// Output runs a program in dir and returns its stdout; its error carries
// the program's stderr.
func Output(dir, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v: %s", filepath.Base(name), strings.Join(args, " "), err,
			strings.TrimSpace(stderr.String()+"\n"+string(out)))
	}
	return out, nil
}

// Reusable says whether dir holds complete images made by a harness whose
// images are at version (a string that changes with the images' recipe
// and parameters).
func Reusable(dir, version string) bool {
	got, err := os.ReadFile(filepath.Join(dir, "done"))
	return err == nil && string(got) == version
}

// MarkDone marks the images in dir as complete, made at version.
func MarkDone(dir, version string) error {
	return os.WriteFile(filepath.Join(dir, "done"), []byte(version), 0o644)
}
