package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapfs/internal/qemutest"
)

// makeChain builds a three-layer qcow2 chain in dir with data, zero
// clusters, compressed clusters, holes and a base shorter than its
// overlay (it reads as zeros past its end), and returns the top.
func makeChain(t *testing.T, dir string) string {
	t.Helper()
	base := qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "24M", "-o", "cluster_size=4k")
	qemutest.IO(t, base, "write -P 0x11 0 6M", "write -c -P 0x12 8M 1M", "write -P 0x13 20M 4M")
	mid := qemutest.Create(t, "qcow2", filepath.Join(dir, "mid.qcow2"), "32M", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, mid, "write -P 0x21 1M 2M", "write -z 4M 1M", "write -P 0x22 26M 1M")
	top := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "32M",
		"-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=128k,extended_l2=on")
	qemutest.IO(t, top, "write -P 0x31 2M 8k", "write -z 21M 128k", "write -P 0x32 30M 512k")
	return top
}

// leftovers lists the temporary files of convert in dir: there must be none
// once it has exited, whatever happened.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, ".*.tmp-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// blocksUsed returns the bytes that a file takes on disk.
func blocksUsed(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestConvertRoundTrips(t *testing.T) {
	dir := t.TempDir()
	top := makeChain(t, dir)
	var info jsonInfo
	if err := json.Unmarshal([]byte(mustSucceed(t, "info", "--json", top)), &info); err != nil {
		t.Fatal(err)
	}
	sizes := map[string]int64{}
	for _, tc := range []struct {
		name string
		args []string
		// compression is the compression type qemu-img must see ("" for raw).
		compression string
	}{
		{"default is raw", nil, ""},
		{"raw", []string{"-O", "raw"}, ""},
		{"qcow2", []string{"-O", "qcow2"}, "zlib"},
		{"qcow2 zlib", []string{"-O", "qcow2", "-c", "zlib"}, "zlib"},
		{"qcow2 zstd", []string{"-O", "qcow2", "-c", "zstd"}, "zstd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".img")
			if out := mustSucceed(t, append(append([]string{"convert"}, tc.args...), top, dst)...); out != "" {
				t.Errorf("convert printed %q on stdout", out)
			}
			qemutest.Compare(t, top, dst)
			got := qemutest.ImgInfo(t, dst)
			if got.VirtualSize != info.VirtualSize || got.BackingFilename != "" {
				t.Errorf("output: %d bytes, backing %q; want %d bytes and no backing file", got.VirtualSize, got.BackingFilename, info.VirtualSize)
			}
			if tc.compression == "" {
				if got.Format != "raw" {
					t.Fatalf("output format %s, want raw", got.Format)
				}
				// Sparse: only what reads as data takes disk space (plus a
				// little for the filesystem's own rounding).
				if used := blocksUsed(t, dst); used > info.AllocatedBytes+1<<20 {
					t.Errorf("raw output takes %d bytes on disk for %d bytes of data: not sparse", used, info.AllocatedBytes)
				}
			} else {
				qemutest.Check(t, dst)
				if got.Format != "qcow2" || got.FormatSpecific.Data.CompressionType != tc.compression {
					t.Errorf("output %s with compression %q, want qcow2 with %q", got.Format, got.FormatSpecific.Data.CompressionType, tc.compression)
				}
			}
			st, err := os.Stat(dst)
			if err != nil {
				t.Fatal(err)
			}
			if want := 0o666 &^ currentUmask(); st.Mode().Perm() != want {
				t.Errorf("new output has mode %v, want %v (0666 less the umask)", st.Mode().Perm(), want)
			}
			sizes[tc.name] = st.Size()
			if l := leftovers(t, dir); len(l) > 0 {
				t.Errorf("temporary files left behind: %v", l)
			}
		})
	}
	// The patterns compress to almost nothing: a compressed output that is
	// not much smaller than the plain one was not compressed.
	for _, c := range []string{"qcow2 zlib", "qcow2 zstd"} {
		if sizes[c] == 0 || sizes[c]*4 > sizes["qcow2"] {
			t.Errorf("%s output is %d bytes, plain qcow2 %d: not compressed", c, sizes[c], sizes["qcow2"])
		}
	}
}

func TestConvertOverlay(t *testing.T) {
	dir := t.TempDir()
	top := makeChain(t, dir)
	topClusters := qemutest.Check(t, top).AllocatedClusters

	// A relative BASE is found from DST's directory and stored as given.
	out := filepath.Join(dir, "delta.qcow2")
	mustSucceed(t, "convert", "-O", "qcow2", "-B", "mid.qcow2", top, out)
	got := qemutest.ImgInfo(t, out)
	if got.BackingFilename != "mid.qcow2" || got.BackingFormat != "qcow2" {
		t.Errorf("overlay backing %q (%q), want mid.qcow2 (qcow2)", got.BackingFilename, got.BackingFormat)
	}
	qemutest.Check(t, out)
	qemutest.Compare(t, top, out)
	// Only what top changes over mid is stored; top's clusters are 128k,
	// the overlay's 64k, so it holds at most twice as many.
	if c := qemutest.Check(t, out).AllocatedClusters; c > 2*topClusters+8 {
		t.Errorf("overlay holds %d clusters; top itself holds %d", c, topClusters)
	}

	// An absolute BASE in another directory, compressed.
	other := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	out2 := filepath.Join(other, "delta2.qcow2")
	mustSucceed(t, "convert", "-O", "qcow2", "-c", "zstd", "-B", base, top, out2)
	if got := qemutest.ImgInfo(t, out2); got.BackingFilename != base {
		t.Errorf("overlay backing %q, want %q", got.BackingFilename, base)
	}
	qemutest.Check(t, out2)
	qemutest.Compare(t, top, out2)

	// A relative BASE that is not beside DST is an error about BASE, even
	// if it exists relative to the current directory.
	mustFailWith(t, []string{"convert", "-O", "qcow2", "-B", "mid.qcow2", top, filepath.Join(other, "x.qcow2")}, "mid.qcow2", "no such file")
	if _, err := os.Stat(filepath.Join(other, "x.qcow2")); err == nil {
		t.Error("x.qcow2 was created although convert failed")
	}
	if l := leftovers(t, other); len(l) > 0 {
		t.Errorf("temporary files left behind: %v", l)
	}
}

func TestConvertErrors(t *testing.T) {
	dir := t.TempDir()
	good := qemutest.Create(t, "qcow2", filepath.Join(dir, "good.qcow2"), "4M")
	qemutest.IO(t, good, "write -P 1 0 1M")

	// Big enough for two L2 tables (one per 512 MiB); cut off where the
	// second one starts, so the image opens and fails half way through.
	truncated := qemutest.Create(t, "qcow2", filepath.Join(dir, "truncated.qcow2"), "2G")
	qemutest.IO(t, truncated, "write -P 1 0 1M", "write -P 2 1G 1M")
	if err := os.Truncate(truncated, l2Offset(t, truncated, 2)); err != nil {
		t.Fatal(err)
	}
	orphan := qemutest.Create(t, "qcow2", filepath.Join(dir, "orphan.qcow2"), "1M", "-b", "nowhere.qcow2", "-F", "qcow2", "-u")
	notDir := filepath.Join(dir, "no-such-dir", "out.raw")
	subdir := filepath.Join(dir, "subdir")
	if err := os.Mkdir(subdir, 0o755); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.qcow2")

	for _, tc := range []struct {
		name string
		args []string
		dst  string
		want []string
	}{
		{"missing source", []string{missing}, filepath.Join(dir, "o1.raw"), []string{missing, "no such file"}},
		{"truncated source", []string{truncated}, filepath.Join(dir, "o2.raw"), []string{truncated, "corrupt"}},
		{"truncated source to qcow2", []string{"-O", "qcow2", truncated}, filepath.Join(dir, "o3.qcow2"), []string{truncated, "corrupt"}},
		{"missing backing file", []string{orphan}, filepath.Join(dir, "o4.raw"), []string{orphan, "nowhere.qcow2"}},
		{"missing base", []string{"-O", "qcow2", "-B", "nobase.qcow2", good}, filepath.Join(dir, "o5.qcow2"), []string{"nobase.qcow2", "no such file"}},
		{"no such output directory", []string{good}, notDir, []string{notDir, "no such file"}},
		{"output is a directory", []string{good}, subdir, []string{subdir, "not a regular file but a directory"}},
		{"output is a device", []string{good}, "/dev/null", []string{"/dev/null", "not a regular file but a character device"}},
		{"output is the source", []string{good}, good, []string{good, "input"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, existed := os.Stat(tc.dst)
			mustFailWith(t, append(append([]string{"convert"}, tc.args...), tc.dst), tc.want...)
			if _, err := os.Stat(tc.dst); existed != nil && err == nil {
				t.Errorf("%s exists after a failed convert", tc.dst)
			}
			if l := leftovers(t, dir); len(l) > 0 {
				t.Errorf("temporary files left behind: %v", l)
			}
		})
	}
	// The source is untouched by the refused overwrite.
	qemutest.Check(t, good)
}

// l2Offset returns where the L2 table of L1 entry i of a qcow2 image starts.
func l2Offset(t *testing.T, path string, i int) int64 {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l1 := binary.BigEndian.Uint64(data[40:48])
	off := int64(binary.BigEndian.Uint64(data[l1+8*uint64(i):]) & 0x00fffffffffffe00)
	if off == 0 || off >= int64(len(data)) {
		t.Fatalf("%s: no L2 table in L1[%d] (%#x)", path, i, off)
	}
	return off
}

func TestConvertFailureKeepsOldOutput(t *testing.T) {
	dir := t.TempDir()
	bad := qemutest.Create(t, "qcow2", filepath.Join(dir, "bad.qcow2"), "64M")
	qemutest.IO(t, bad, "write -P 1 0 4M")
	if err := os.Truncate(bad, 3*64<<10); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "out.raw")
	old := []byte("the previous conversion")
	if err := os.WriteFile(dst, old, 0o600); err != nil {
		t.Fatal(err)
	}
	mustFailWith(t, []string{"convert", bad, dst}, bad)
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, old) {
		t.Errorf("failed convert changed the existing output: %q, %v", got, err)
	}

	// A successful one replaces it, keeping its mode.
	good := qemutest.Create(t, "qcow2", filepath.Join(dir, "good.qcow2"), "1M")
	qemutest.IO(t, good, "write -P 7 0 64k")
	mustSucceed(t, "convert", good, dst)
	qemutest.Compare(t, good, dst)
	if st, err := os.Stat(dst); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("replaced output: %v, %v; want mode 0600 kept", st.Mode(), err)
	}
}

func TestConvertInterrupted(t *testing.T) {
	dir := t.TempDir()
	// 512 MiB of compressed clusters take a file of a few hundred KiB
	// but a good second to inflate and write out: time to interrupt.
	src := qemutest.Create(t, "qcow2", filepath.Join(dir, "big.qcow2"), "512M", "-o", "compression_type=zstd")
	var cmds []string
	for off := 0; off < 512; off += 128 {
		cmds = append(cmds, fmt.Sprintf("write -c -P 0x5a %dM 128M", off))
	}
	qemutest.IO(t, src, cmds...)
	dst := filepath.Join(dir, "out.raw")

	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			var stderr bytes.Buffer
			cmd := exec.Command(snapfsBin, "convert", src, dst)
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Interrupt once the conversion is under way: its temporary
			// file exists and has data.
			deadline := time.Now().Add(time.Minute)
			for {
				if l := leftovers(t, dir); len(l) == 1 {
					if st, err := os.Stat(l[0]); err == nil && st.Size() > 0 {
						break
					}
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatal("convert did not start writing within a minute")
				}
				time.Sleep(5 * time.Millisecond)
			}
			cmd.Process.Signal(sig)
			err := cmd.Wait()
			if code := cmd.ProcessState.ExitCode(); code != 1 {
				t.Fatalf("interrupted convert: exit %d (%v), want 1; stderr %q", code, err, stderr.String())
			}
			if want := "snapfs: " + dst + ": interrupted\n"; stderr.String() != want {
				t.Errorf("stderr %q, want %q", stderr.String(), want)
			}
			if _, err := os.Stat(dst); err == nil {
				t.Error("interrupted convert left its output")
			}
			if l := leftovers(t, dir); len(l) > 0 {
				t.Errorf("interrupted convert left temporary files: %v", l)
			}
		})
	}
}
