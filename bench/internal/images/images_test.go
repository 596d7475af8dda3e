package images

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteRanges writes two patterns into a qcow2 image with qemu-io and
// reads the image back with qemu-img: each range holds its pattern (from
// the pattern's start, chunk by chunk), the rest reads as zeros.
func TestWriteRanges(t *testing.T) {
	dir := t.TempDir()
	a, err := WritePattern(dir, "a", 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := WritePattern(dir, "b", 2)
	if err != nil {
		t.Fatal(err)
	}
	pa, _ := os.ReadFile(a)
	pb, _ := os.ReadFile(b)
	if bytes.Equal(pa[:1<<20], pb[:1<<20]) {
		t.Fatal("two seeds gave the same pattern")
	}
	if err := Tool(dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"); err != nil {
		t.Fatal(err)
	}
	// Relative names: qemu-io runs in dir.
	if err := WriteRanges(dir, "img.qcow2", Write{"a", 0, 64 << 10}, Write{"b", 1 << 20, 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := Tool(dir, "qemu-img", "convert", "-O", "raw", "img.qcow2", "img.raw"); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "img.raw"))
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	copy(want, pa[:64<<10])
	copy(want[1<<20:], pb[:1<<20])
	if !bytes.Equal(got, want) {
		t.Error("the image does not hold the patterns where they were written")
	}
	if err := Tool(dir, "qemu-io", "-c", "bogus"); err == nil {
		t.Error("a failing tool gave no error")
	}
}

func TestReusable(t *testing.T) {
	dir := t.TempDir()
	if Reusable(dir, "1") {
		t.Error("an empty directory is reusable")
	}
	if err := MarkDone(dir, "1 size=2G"); err != nil {
		t.Fatal(err)
	}
	if !Reusable(dir, "1 size=2G") || Reusable(dir, "1 size=4G") {
		t.Error("Reusable does not follow the version MarkDone wrote")
	}
}
