package qcow_test

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"snapfs/qcow"
)

// TestOpenFileRefusesSpecialFiles: only files and block devices are
// images. A named pipe with no writer is refused at once: its open used to
// wait for a writer, and snapfs volume import of one hung through SIGTERM.
func TestOpenFileRefusesSpecialFiles(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for path, kind := range map[string]string{fifo: "a named pipe", "/dev/null": "a character device", t.TempDir(): "a directory"} {
		f, err := qcow.OpenFile(path)
		if err == nil {
			f.Close()
			t.Errorf("%s: opened", path)
			continue
		}
		if !strings.Contains(err.Error(), kind) {
			t.Errorf("%s: got %v, want an error naming %s", path, err, kind)
		}
	}
}
