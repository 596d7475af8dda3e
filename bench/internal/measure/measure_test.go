package measure

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"4096", 4096}, {"64k", 64 << 10}, {"256M", 256 << 20}, {"2G", 2 << 30}, {"1T", 1 << 40},
	} {
		if got, err := ParseSize(tc.in); err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "G", "-1G", "0", "1.5G", "2X", "99999999T"} {
		if got, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", bad, got)
		}
	}
}

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var d []time.Duration
		for _, x := range v {
			d = append(d, time.Duration(x)*time.Millisecond)
		}
		return d
	}
	ten := ms(10, 1, 9, 2, 8, 3, 7, 4, 6, 5) // unsorted on purpose
	for _, tc := range []struct {
		times []time.Duration
		p     float64
		want  time.Duration
	}{
		{ten, 50, 5 * time.Millisecond},
		{ten, 90, 9 * time.Millisecond},
		{ten, 100, 10 * time.Millisecond},
		{ten, 1, 1 * time.Millisecond},
		{ms(7), 90, 7 * time.Millisecond},
		{nil, 50, 0},
	} {
		if got := Percentile(tc.times, tc.p); got != tc.want {
			t.Errorf("Percentile(%v, %v) = %v, want %v", tc.times, tc.p, got, tc.want)
		}
	}
	if ten[0] != 10*time.Millisecond {
		t.Error("Percentile sorted its argument in place")
	}
	if got := Median(ms(3, 1, 2)); got != 2*time.Millisecond {
		t.Errorf("Median of 3 = %v", got)
	}
	if got := Median(ms(4, 1, 3, 2)); got != 3*time.Millisecond {
		t.Errorf("Median of 4 = %v, want the upper middle", got)
	}
}

// TestRun times a real child that allocates and touches 64 MiB: its peak
// RSS must show them, and its output file must exist (fsynced) when Run
// returns.
func TestRun(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out")
	// head -c reads through a buffer; dd with bs=64M holds 64 MiB at once.
	cmd := exec.Command("dd", "if=/dev/zero", "of="+out, "bs=64M", "count=1", "status=none")
	r, err := Run(cmd, out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Time <= 0 || r.PeakRSSKB < 64<<10 {
		t.Errorf("Run = %+v, want a time and a peak RSS of at least 64 MiB", r)
	}
	if st, err := os.Stat(out); err != nil || st.Size() != 64<<20 {
		t.Errorf("output: %v, %v", st, err)
	}
	_, err = Run(exec.Command("sh", "-c", "echo oops >&2; exit 3"))
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("oops")) {
		t.Errorf("a failing child: %v, want its stderr in the error", err)
	}
}

// TestPeakRSS reads and resets the peak RSS of a running child that has
// touched 64 MiB and then freed it.
func TestPeakRSS(t *testing.T) {
	// python3 is what the machine has (make deps installs it with qemu's
	// tools); bash could not free its memory.
	cmd := exec.Command("python3", "-c", "import sys; b = bytearray(64 << 20); del b; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()
	buf := make([]byte, 6)
	if _, err := stdout.Read(buf); err != nil {
		t.Fatal(err)
	}
	peak, err := PeakRSS(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if peak < 64<<10 {
		t.Errorf("peak RSS %d KiB, want at least 64 MiB", peak)
	}
	if err := ResetPeakRSS(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	after, err := PeakRSS(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if after >= peak-32<<10 {
		t.Errorf("peak RSS after reset %d KiB, before %d KiB: not reset", after, peak)
	}
	if _, err := PeakRSS(1 << 30); !errors.Is(err, ErrNoProcess) {
		t.Errorf("PeakRSS of no process: %v, want ErrNoProcess", err)
	}
}

// TestProcessCPU: the CPU time of this process grows by at least what a
// busy loop spends, and a process that is gone is ErrNoProcess.
func TestProcessCPU(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var spent syscall.Rusage
	x := 0
	for {
		for i := range 1 << 20 {
			x += i
		}
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &spent); err != nil {
			t.Fatal(err)
		}
		if time.Duration(spent.Utime.Nano()) >= before+300*time.Millisecond {
			break
		}
	}
	after, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// /proc counts in ticks of 10 ms, rusage more finely.
	if got := after - before; got < 250*time.Millisecond {
		t.Errorf("CPU time grew by %v over a loop of 300 ms of CPU (%d)", got, x)
	}
	if _, err := ProcessCPU(1 << 30); !errors.Is(err, ErrNoProcess) {
		t.Errorf("ProcessCPU of no process: %v, want ErrNoProcess", err)
	}
}

// TestWarmEvict checks that Warm caches a sparse file's data and Evict
// drops it, by the page-cache residency the kernel reports (mincore).
func TestWarmEvict(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte{1}, 4<<20)
	if _, err := f.WriteAt(data, 1<<30); err != nil { // 1 GiB hole, then data
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := Evict(path); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, 1<<30, 4<<20); n != 0 {
		t.Errorf("%d pages cached after Evict", n)
	}
	start := time.Now()
	if err := Warm(path); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > 5*time.Second {
		t.Error("Warm read the hole")
	}
	if n := resident(t, path, 1<<30, 4<<20); n != 4<<20/os.Getpagesize() {
		t.Errorf("%d pages cached after Warm, want all %d", n, 4<<20/os.Getpagesize())
	}
	if err := Evict(path); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, 1<<30, 4<<20); n != 0 {
		t.Errorf("%d pages cached after the second Evict", n)
	}
}

func TestSyncFS(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := SyncFS(dir); err != nil {
		t.Error(err)
	}
	if err := SyncFS(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("SyncFS of a missing path: %v", err)
	}
}
