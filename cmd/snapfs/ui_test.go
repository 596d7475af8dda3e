package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"snapfs/internal/qemutest"
)

func TestProgressLine(t *testing.T) {
	for _, tc := range []struct {
		done, total int64
		elapsed     time.Duration
		want        string
	}{
		{0, 2 << 30, 0, "out.raw [..............................]   0%  0 B / 2 GiB"},
		{1 << 30, 2 << 30, 2 * time.Second, "out.raw [###############...............]  50%  1 GiB / 2 GiB  512 MiB/s"},
		{2 << 30, 2 << 30, time.Second, "out.raw [##############################] 100%  2 GiB / 2 GiB  2 GiB/s"},
		// An empty image is done at once; more than the total never
		// overflows the bar.
		{0, 0, 0, "out.raw [##############################] 100%  0 B / 0 B"},
		{3 << 30, 2 << 30, 0, "out.raw [##############################] 100%  3 GiB / 2 GiB"},
	} {
		if got := progressLine("out.raw", tc.done, tc.total, tc.elapsed); got != tc.want {
			t.Errorf("progressLine(%d, %d, %v) =\n%q, want\n%q", tc.done, tc.total, tc.elapsed, got, tc.want)
		}
	}
}

// openPTY opens a pseudo-terminal pair: the controlling side, which reads
// what is written to the terminal, and the terminal itself.
func openPTY(t *testing.T) (ptmx, tty *os.File) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("opening /dev/ptmx: %v", err)
	}
	t.Cleanup(func() { ptmx.Close() })
	var unlock int32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, ptmx.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); errno != 0 {
		t.Fatalf("unlocking the pty: %v", errno)
	}
	var n uint32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, ptmx.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); errno != 0 {
		t.Fatalf("getting the pty number: %v", errno)
	}
	tty, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("opening the pty: %v", err)
	}
	t.Cleanup(func() { tty.Close() })
	return ptmx, tty
}

// TestProgressBarOnTerminal runs a conversion with stderr on a real
// terminal (a pty) and checks that a bar is drawn and erased; the other CLI
// tests run with stderr on a pipe and check that nothing at all is printed.
func TestProgressBarOnTerminal(t *testing.T) {
	dir := t.TempDir()
	src := qemutest.Create(t, "qcow2", filepath.Join(dir, "src.qcow2"), "256M", "-o", "compression_type=zstd")
	qemutest.IO(t, src, "write -c -P 0x44 0 128M", "write -c -P 0x45 128M 128M")

	ptmx, tty := openPTY(t)
	if !isTerminal(tty) {
		t.Fatal("isTerminal says a pty is not a terminal")
	}
	if devNull, err := os.Open(os.DevNull); err != nil {
		t.Fatal(err)
	} else if isTerminal(devNull) {
		t.Error("isTerminal says /dev/null is a terminal")
	} else {
		devNull.Close()
	}

	dst := filepath.Join(dir, "out.qcow2")
	cmd := exec.Command(snapfsBin, "convert", "-O", "qcow2", src, dst)
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, tty
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Read the terminal while the command runs: a full pty buffer would
	// block it.
	screen := make(chan string)
	go func() {
		var b bytes.Buffer
		io.Copy(&b, ptmx) // ends with EIO once the last tty fd is closed
		screen <- b.String()
	}()
	err := cmd.Wait()
	tty.Close()
	out := <-screen
	if err != nil {
		t.Fatalf("convert: %v; terminal shows %q", err, out)
	}
	qemutest.Compare(t, src, dst)

	if !strings.Contains(out, "out.qcow2 [") || !strings.Contains(out, "/ 256 MiB") {
		t.Errorf("no progress bar on the terminal: %q", out)
	}
	if !strings.HasSuffix(out, "\r\x1b[K") {
		t.Errorf("the bar is not erased at the end: %q", out)
	}
	if strings.Contains(out, "\n") {
		t.Errorf("the bar scrolls the terminal: %q", out)
	}
	if stdout.Len() != 0 {
		t.Errorf("convert printed %q on stdout", stdout.String())
	}
}
