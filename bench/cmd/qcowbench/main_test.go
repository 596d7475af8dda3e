package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	cfg, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	// The defaults are the sizes issue 2 asks for: make bench uses them.
	if cfg.size != 2<<30 || cfg.layers != 8 || cfg.sparseVirtual != 1<<40 || cfg.sparseData != 1<<30 ||
		cfg.sparseSmall != 2<<30 || cfg.runs != 3 || cfg.cases != "abcd" {
		t.Errorf("defaults %+v", cfg)
	}
	for _, bad := range [][]string{
		{"-runs", "0"}, {"-cases", "ax"}, {"-size", "1M"}, {"-sparse-data", "4G"}, {"extra"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
}

// TestSmallRun runs every case end to end on small images, so that `make
// bench` keeps working: the images are made, both tools run, snapfs's
// outputs are checked with qemu-img compare and the table is printed.
func TestSmallRun(t *testing.T) {
	dir := t.TempDir()
	snapfs := filepath.Join(dir, "snapfs")
	build := exec.Command("go", "build", "-o", snapfs, "snapfs/cmd/snapfs")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building snapfs: %v\n%s", err, out)
	}
	// Relative paths, as make bench gives them.
	t.Chdir(dir)
	work := "work"
	cfg, err := parseFlags([]string{"-snapfs", "./snapfs", "-work", work, "-size", "16M", "-layers", "4",
		"-sparse-virtual", "8G", "-sparse-small", "32M", "-sparse-data", "8M", "-runs", "2",
		// Dropping the page cache would slow down everything else on the
		// machine; the real benchmark does it.
		"-drop-caches=false", "-keep=false"})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run(cfg, &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	text := out.String()
	for _, want := range []string{
		"page cache warmed",
		"a. to raw", "b. to qcow2", "c. to qcow2 zstd", "d. raw, 8 GiB virtual", "d. raw, 32 MiB virtual",
		"d. snapfs: time for 8 GiB virtual / time for 32 MiB virtual",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	if n := strings.Count(text, "(snapfs/qemu-img: snapfs "); n != 5 {
		t.Errorf("%d ratio rows, want 5:\n%s", n, text)
	}
	if _, err := os.Stat(work); err == nil {
		t.Errorf("-keep=false left %s behind", work)
	}
}
