package fs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/internal/qemutest"
)

// TestSparseCopy copies disk.raw of a 1 TiB volume holding a few MiB with
// cp --sparse=auto: cp sees honest st_blocks, asks SEEK_DATA/SEEK_HOLE, and
// copies only the data, in seconds.
func TestSparseCopy(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "big", 1<<40,
		"write -P 0x31 0 1M",
		"write -P 0x32 300G 2M",
		"write -P 0x33 1023G 1M",
		"write -z 300G 64k", // a zero cluster inside data: a hole too
	)
	m := mount(t, store)
	snaps := m.path("volumes", "big", "snapshots")
	if err := os.Mkdir(filepath.Join(snaps, "s"), 0o755); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(snaps, "s", "disk.raw")
	st, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if st.Size() != 1<<40 {
		t.Fatalf("disk.raw size %d, want 1 TiB", st.Size())
	}
	if got, want := sys.Blocks*512, int64(4<<20-64<<10); got != want {
		t.Errorf("disk.raw st_blocks*512 = %d, want %d (the data only)", got, want)
	}

	for _, file := range []string{raw, m.path("volumes", "big", "head.raw")} {
		out := filepath.Join(t.TempDir(), "copy.raw")
		start := time.Now()
		cmd := exec.Command("cp", "--sparse=auto", file, out)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cp: %v: %s", err, b)
		}
		elapsed := time.Since(start)
		if elapsed > 20*time.Second {
			t.Errorf("cp --sparse=auto of %s took %v", file, elapsed)
		}
		du, err := exec.Command("du", "-k", out).Output()
		if err != nil {
			t.Fatal(err)
		}
		kib, _ := strconv.Atoi(strings.Fields(string(du))[0])
		if kib > 8<<10 {
			t.Errorf("du of the copy of %s: %d KiB, want a few MiB", file, kib)
		}
		t.Logf("cp --sparse=auto %s: %v, du %d KiB", filepath.Base(file), elapsed, kib)
		qemutest.Compare(t, out, snapshotPath(t, store, "big", "s"))
	}
}
