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
	m := testMount(t, store)
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

	// disk.qcow2 holds the data only, and says so in st_blocks.
	qc := filepath.Join(snaps, "s", "disk.qcow2")
	st, err = os.Stat(qc)
	if err != nil {
		t.Fatal(err)
	}
	if blocks := st.Sys().(*syscall.Stat_t).Blocks * 512; st.Size() > 16<<20 || blocks > st.Size() || blocks < 4<<20-64<<10 {
		t.Errorf("disk.qcow2 of 1 TiB holding 4 MiB: size %d, st_blocks*512 %d", st.Size(), blocks)
	}
	qemutest.Check(t, qc)
	qemutest.Compare(t, qc, snapshotPath(t, store, "big", "s"))

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

// TestSparseTools: tar -S finds the holes of a 1 TiB disk.raw by
// SEEK_HOLE too; rsync -S, which looks for runs of zeros in what it reads,
// keeps them on a smaller one. Both copies read back as the snapshot.
func TestSparseTools(t *testing.T) {
	store := newStore(t)
	newVolume(t, store, "big", 1<<40, "write -P 0x31 0 1M", "write -P 0x32 700G 1M")
	newVolume(t, store, "small", 256<<20, "write -P 0x41 1M 1M", "write -P 0x42 200M 1M")
	m := testMount(t, store)
	for _, v := range []string{"big", "small"} {
		if err := os.Mkdir(m.path("volumes", v, "snapshots", "s"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()

	start := time.Now()
	tarball := filepath.Join(out, "big.tar")
	if b, err := exec.Command("tar", "-C", m.path("volumes/big/snapshots/s"), "-cSf", tarball, "disk.raw").CombinedOutput(); err != nil {
		t.Fatalf("tar -cS: %v: %s", err, b)
	}
	if st, err := os.Stat(tarball); err != nil || st.Size() > 8<<20 {
		t.Fatalf("tar of a 1 TiB disk.raw holding 2 MiB: %v, %v", st.Size(), err)
	}
	if b, err := exec.Command("tar", "-C", out, "-xSf", tarball).CombinedOutput(); err != nil {
		t.Fatalf("tar -xS: %v: %s", err, b)
	}
	qemutest.Compare(t, filepath.Join(out, "disk.raw"), snapshotPath(t, store, "big", "s"))
	t.Logf("tar -S of 1 TiB: %v", time.Since(start))

	copied := filepath.Join(out, "small.raw")
	if b, err := exec.Command("rsync", "-S", m.path("volumes/small/snapshots/s/disk.raw"), copied).CombinedOutput(); err != nil {
		t.Fatalf("rsync -S: %v: %s", err, b)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(copied, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 8<<20 {
		t.Errorf("rsync -S copy takes %d bytes", st.Blocks*512)
	}
	qemutest.Compare(t, copied, snapshotPath(t, store, "small", "s"))
}
