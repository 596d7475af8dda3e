package qcow_test

// Refusals: images made by qemu-img, then corrupted byte by byte in Go the
// way qemu's iotests 060 and 080 corrupt them (and more, from the qcow2
// specification). Each must fail with the right sentinel error, at open or
// at the latest when read, never panic and never allocate more than the
// file is worth.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"snapfs/internal/qemutest"
	"snapfs/qcow"
)

// Offsets of qcow2 header fields.
const (
	hdrVersion          = 4
	hdrBackingOffset    = 8
	hdrBackingSize      = 16
	hdrClusterBits      = 20
	hdrSize             = 24
	hdrCryptMethod      = 32
	hdrL1Size           = 36
	hdrL1Offset         = 40
	hdrRefTableOffset   = 48
	hdrRefTableClusters = 56
	hdrNbSnapshots      = 60
	hdrSnapshotsOffset  = 64
	hdrIncompatible     = 72
	hdrRefcountOrder    = 96
	hdrHeaderLength     = 100
	hdrCompressionType  = 104
)

var be = binary.BigEndian

// qemuImage makes an image as iotests' _make_test_img does, with qemu-img
// create (64 KiB clusters unless opts say otherwise) and then the qemu-io
// commands, and returns the file's bytes.
func qemuImage(t *testing.T, size string, opts []string, cmds ...string) []byte {
	t.Helper()
	path := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "t.qcow2"), size, opts...)
	if len(cmds) > 0 {
		qemutest.IO(t, path, cmds...)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// poke64 and poke32 write big-endian fields, as iotests' poke_file does.
func poke64(b []byte, off int64, v uint64) { be.PutUint64(b[off:], v) }
func poke32(b []byte, off int64, v uint32) { be.PutUint32(b[off:], v) }

// l1Offset and l2Offset find the active L1 table and the first L2 table.
func l1Offset(b []byte) int64 { return int64(be.Uint64(b[hdrL1Offset:])) }
func l2Offset(b []byte) int64 { return int64(be.Uint64(b[l1Offset(b):]) & 0x00fffffffffffe00) }

// headerLength is where the header extensions start.
func headerLength(b []byte) int64 { return int64(be.Uint32(b[hdrHeaderLength:])) }

// firstRefBlock is the offset of the first refcount block.
func firstRefBlock(b []byte) int64 { return int64(be.Uint64(b[be.Uint64(b[hdrRefTableOffset:]):])) }

// snapshotEntry is the offset of the first snapshot table entry.
func snapshotEntry(b []byte) int64 { return int64(be.Uint64(b[hdrSnapshotsOffset:])) }

// findExtension returns the offset of the data of header extension typ.
func findExtension(t *testing.T, b []byte, typ uint32) int64 {
	t.Helper()
	for off := headerLength(b); off+8 <= int64(len(b)); {
		ty, n := be.Uint32(b[off:]), int64(be.Uint32(b[off+4:]))
		if ty == typ {
			return off + 8
		}
		if ty == 0 {
			break
		}
		off += 8 + (n+7)&^7
	}
	t.Fatalf("no header extension %#x", typ)
	return 0
}

// corruptCase is one refusal. open returns what to open; the chain must
// fail with want, at open or when read.
type corruptCase struct {
	name string // "080: ..." for cases ported from qemu's iotests
	open func(t *testing.T, dir string) (qcow.File, qcow.Options)
	want error
}

// bytesCase opens a corrupted qemu image from memory, untrusted.
func bytesCase(name string, want error, size string, opts []string, cmds []string, corrupt func(t *testing.T, b []byte) []byte) corruptCase {
	return corruptCase{name: name, want: want, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		b := corrupt(t, qemuImage(t, size, opts, cmds...))
		return qcow.BytesFile("t.qcow2", b), qcow.Options{Untrusted: true}
	}}
}

// fileCase opens a file in dir, untrusted, with backing files allowed in
// dir only.
func fileCase(name string, want error, build func(t *testing.T, dir string) string) corruptCase {
	return corruptCase{name: name, want: want, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		f, err := qcow.OpenFile(build(t, dir))
		if err != nil {
			t.Fatal(err)
		}
		return f, qcow.Options{Untrusted: true, Open: qcow.DirOpener(false)}
	}}
}

func corruptCases() []corruptCase {
	const m64 = "64M"
	var write512 = []string{"write 0 512"}
	var write64k = []string{"write 0 64k"}
	var cases []corruptCase
	add := func(c corruptCase) { cases = append(cases, c) }
	poke := func(name string, want error, cmds []string, f func(b []byte)) {
		add(bytesCase(name, want, m64, nil, cmds, func(t *testing.T, b []byte) []byte { f(b); return b }))
	}

	// iotests 080: qcow2 format input validation.
	poke("080: huge header size (0xffffffff)", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrHeaderLength, 0xffffffff) })
	poke("080: huge header size (0x7fffffff)", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrHeaderLength, 0x7fffffff) })
	poke("080: huge unknown header extension, backing name offset 2^64-1", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrBackingOffset, ^uint64(0))
		poke32(b, headerLength(b), 0x12345678)
		poke32(b, headerLength(b)+4, 0x7fffffff)
	})
	poke("080: huge unknown header extension, backing name inside it", qcow.ErrCorrupt, nil, func(b []byte) {
		hl := headerLength(b)
		poke32(b, hl, 0x12345678)
		poke32(b, hl+4, 0x7fffffff)
		poke64(b, hdrBackingOffset, uint64(hl+4))
	})
	poke("080: huge unknown header extension", qcow.ErrCorrupt, nil, func(b []byte) {
		poke32(b, headerLength(b), 0x12345678)
		poke32(b, headerLength(b)+4, 0x7fffffff)
	})
	poke("080: huge refcount table size (0xffffffff clusters)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrRefTableClusters, 0xffffffff) })
	poke("080: huge refcount table size (0x20001 clusters)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrRefTableClusters, 0x00020001) })
	poke("080: misaligned refcount table", qcow.ErrCorrupt, nil, func(b []byte) { poke64(b, hdrRefTableOffset, 0x1234567890abcdef) })
	poke("080: huge refcount offset", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrRefTableOffset, 0xffffffffffff0000)
		poke32(b, hdrRefTableClusters, 0x7f)
	})
	poke("080: invalid snapshot table (0xffffffff snapshots)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrNbSnapshots, 0xffffffff) })
	poke("080: invalid snapshot table (0x7fffffff snapshots)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrNbSnapshots, 0x7fffffff) })
	poke("080: invalid snapshot table (offset 2^64-2^16)", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrSnapshotsOffset, 0xffffffffffff0000)
		poke32(b, hdrNbSnapshots, 0xffff)
	})
	poke("080: invalid snapshot table (unaligned offset, no snapshots)", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrSnapshotsOffset, 0x1234567890abcdef)
		poke32(b, hdrNbSnapshots, 0)
	})
	// qemu reads it as EIO ("Zero cluster entry found in pre-v3 image").
	poke("version 2 image with a zero cluster", qcow.ErrCorrupt, []string{"write -z 0 64k"}, func(b []byte) { poke32(b, hdrVersion, 2) })
	// qemu refuses it ("Snapshot table offset invalid"), so a store that
	// kept it would hold a layer qemu cannot open.
	poke("snapshot table offset 2^63, no snapshots", qcow.ErrCorrupt, write512, func(b []byte) {
		poke64(b, hdrSnapshotsOffset, 1<<63)
		poke32(b, hdrNbSnapshots, 0)
	})
	// qemu opens this one (it reads zeros past the end of the file); we
	// refuse a table that is not in the file.
	poke("080: hitting snapshot table size limit (table past the end of the file)", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrSnapshotsOffset, 16<<20)
		poke32(b, hdrNbSnapshots, 0x10000)
	})
	// qemu refuses it ("Compression type incompatible feature bit must
	// not be set"), so a store that kept it would hold a layer qemu cannot
	// open.
	poke("compression-type feature bit with zlib", qcow.ErrCorrupt, write512, func(b []byte) { b[hdrIncompatible+7] |= 1 << 3 })
	poke("080: invalid L1 table (0xffffffff entries)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrL1Size, 0xffffffff) })
	poke("080: invalid L1 table (0x7fffffff entries)", qcow.ErrLimit, nil, func(b []byte) { poke32(b, hdrL1Size, 0x7fffffff) })
	poke("080: invalid L1 table (offset near 2^63)", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrL1Offset, 0x7fffffffffff0000)
		poke32(b, hdrL1Size, 0xffff)
	})
	poke("080: invalid L1 table (unaligned offset)", qcow.ErrCorrupt, nil, func(b []byte) {
		poke64(b, hdrL1Offset, 0x1234567890abcdef)
		poke32(b, hdrL1Size, 1)
	})
	add(bytesCase("080: invalid L1 table (with internal snapshot in the image): L1 too small", qcow.ErrCorrupt, m64, nil, nil,
		func(t *testing.T, _ []byte) []byte {
			path := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "t.qcow2"), m64)
			qemutest.Img(t, "snapshot", "-c", "foo", path)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			poke32(b, hdrL1Size, 0)
			return b
		}))
	poke("080: invalid backing file size", qcow.ErrLimit, nil, func(b []byte) {
		poke64(b, hdrBackingOffset, 0x1000)
		poke32(b, hdrBackingSize, 0xffffffff)
	})
	snapshot := func(name string, want error, f func(b []byte)) {
		add(bytesCase(name, want, m64, nil, nil, func(t *testing.T, _ []byte) []byte {
			path := qemutest.Create(t, "qcow2", filepath.Join(t.TempDir(), "t.qcow2"), m64)
			qemutest.IO(t, path, "write 0 512")
			qemutest.Img(t, "snapshot", "-c", "test", path)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			f(b)
			return b
		}))
	}
	// qemu opens these two and fails only when the snapshot is used; we
	// check every table when we open the image.
	snapshot("080: invalid snapshot L1 table offset", qcow.ErrCorrupt, func(b []byte) { poke64(b, snapshotEntry(b), 0x400200) })
	snapshot("080: invalid snapshot L1 table size", qcow.ErrLimit, func(b []byte) { poke32(b, snapshotEntry(b)+8, 0x10000000) })

	// iotests 060: corruption (qemu refuses these when it reads them).
	poke("060: unaligned L1 entry", qcow.ErrCorrupt, write64k, func(b []byte) { poke64(b, l1Offset(b), 0x8000000000042a00) })
	poke("060: unaligned L2 entry", qcow.ErrCorrupt, write64k, func(b []byte) { poke64(b, l2Offset(b), 0x8000000000052a00) })
	poke("060: unaligned pre-allocated zero cluster", qcow.ErrCorrupt, write64k, func(b []byte) { poke64(b, l2Offset(b), 0x8000000000052a01) })
	poke("060: writing to an unaligned preallocated zero cluster", qcow.ErrCorrupt, []string{"write 0 64k", "discard 0 64k"},
		func(b []byte) { poke64(b, l2Offset(b), 0x8000000000002a01) })
	poke("060: zero refcount table size", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrRefTableClusters, 0) })

	// The header, field by field.
	add(corruptCase{name: "bad magic (format given as qcow2)", want: qcow.ErrCorrupt, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		b := qemuImage(t, "1M", nil)
		b[0] = 'X'
		f := qcow.FormatQcow2
		return qcow.BytesFile("t.qcow2", b), qcow.Options{Untrusted: true, Format: &f}
	}})
	add(corruptCase{name: "file shorter than a header (format given as qcow2)", want: qcow.ErrCorrupt, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		f := qcow.FormatQcow2
		return qcow.BytesFile("t.qcow2", qemuImage(t, "1M", nil)[:60]), qcow.Options{Untrusted: true, Format: &f}
	}})
	for _, v := range []uint32{0, 1, 4, 0xffffffff} {
		poke(fmt.Sprintf("version %d", v), qcow.ErrUnsupported, nil, func(b []byte) { poke32(b, hdrVersion, v) })
	}
	for _, bits := range []uint32{0, 8, 22, 63, 0xffffffff} {
		poke(fmt.Sprintf("cluster bits %d", bits), qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrClusterBits, bits) })
	}
	poke("header length below 104", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrHeaderLength, 100) })
	poke("header length not a multiple of 8", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrHeaderLength, 108) })
	poke("unknown incompatible feature bit 5", qcow.ErrUnsupported, nil, func(b []byte) { b[hdrIncompatible+7] |= 1 << 5 })
	poke("unknown incompatible feature bit 63", qcow.ErrUnsupported, nil, func(b []byte) { b[hdrIncompatible] |= 0x80 })
	poke("unknown compression type 2", qcow.ErrUnsupported, nil, func(b []byte) {
		b[hdrIncompatible+7] |= 1 << 3
		b[hdrCompressionType] = 2
	})
	poke("zstd without the compression type feature bit", qcow.ErrCorrupt, nil, func(b []byte) { b[hdrCompressionType] = 1 })
	add(bytesCase("extended L2 entries with 4 KiB clusters", qcow.ErrCorrupt, "1M", []string{"-o", "cluster_size=4k"}, nil,
		func(t *testing.T, b []byte) []byte { b[hdrIncompatible+7] |= 1 << 4; return b }))
	poke("refcount order 7", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrRefcountOrder, 7) })
	poke("virtual size 2^63", qcow.ErrLimit, nil, func(b []byte) { poke64(b, hdrSize, 1<<63) })
	poke("virtual size beyond what the L1 table maps", qcow.ErrCorrupt, nil, func(b []byte) { poke64(b, hdrSize, 1<<40) })
	poke("encryption method 3", qcow.ErrCorrupt, nil, func(b []byte) { poke32(b, hdrCryptMethod, 3) })
	secret := []string{"--object", "secret,id=sec0,data=123456"}
	add(bytesCase("AES encryption (qemu-img create -o encrypt.format=aes)", qcow.ErrEncrypted, "1M",
		append(secret, "-o", "encrypt.format=aes,encrypt.key-secret=sec0"), nil, func(t *testing.T, b []byte) []byte { return b }))
	// Making a LUKS image takes qemu-img seconds: make it once.
	var luks struct {
		sync.Once
		b []byte
	}
	luksImage := func(t *testing.T) []byte {
		luks.Do(func() {
			var err error
			luks.b, err = os.ReadFile(qemutest.CreateLUKS(t, filepath.Join(t.TempDir(), "luks.qcow2")))
			if err != nil {
				t.Fatal(err)
			}
		})
		if luks.b == nil {
			t.Fatal("no LUKS image: making it failed")
		}
		return slices.Clone(luks.b)
	}
	add(corruptCase{name: "LUKS encryption (qemu-img create -o encrypt.format=luks)", want: qcow.ErrEncrypted, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		return qcow.BytesFile("t.qcow2", luksImage(t)), qcow.Options{Untrusted: true}
	}})
	add(corruptCase{name: "LUKS header extension with the encryption method cleared", want: qcow.ErrEncrypted, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		b := luksImage(t)
		poke32(b, hdrCryptMethod, 0)
		return qcow.BytesFile("t.qcow2", b), qcow.Options{Untrusted: true}
	}})
	poke("header extension running past the first cluster", qcow.ErrCorrupt, nil, func(b []byte) {
		poke32(b, headerLength(b), 0x12345678)
		poke32(b, headerLength(b)+4, 65536-uint32(headerLength(b))-8+1)
	})

	// Tables past the end of the file.
	poke("L1 table past the end of the file", qcow.ErrCorrupt, nil, func(b []byte) { poke64(b, hdrL1Offset, uint64(len(b)+0xffff)&^0xffff) })
	poke("refcount table past the end of the file", qcow.ErrCorrupt, nil, func(b []byte) { poke64(b, hdrRefTableOffset, uint64(len(b)+0xffff)&^0xffff) })
	add(bytesCase("L1 table cut by the end of the file", qcow.ErrCorrupt, m64, nil, nil,
		func(t *testing.T, b []byte) []byte { return b[:l1Offset(b)+4] }))
	poke("L2 table past the end of the file", qcow.ErrCorrupt, write512, func(b []byte) {
		poke64(b, l1Offset(b), 1<<63|uint64(len(b)+0xffff)&^0xffff)
	})
	poke("compressed cluster past the end of the file", qcow.ErrCorrupt, []string{"write -c 0 64k"}, func(b []byte) {
		poke64(b, l2Offset(b), 1<<62|uint64(len(b)+4096))
	})
	snapshot("snapshot table with more entries than the file holds", qcow.ErrCorrupt, func(b []byte) { poke32(b, hdrNbSnapshots, 1000) })
	snapshot("snapshot extra data beyond qemu's limit", qcow.ErrCorrupt, func(b []byte) { poke32(b, snapshotEntry(b)+36, 0x10000) })

	// Cluster contents.
	for _, comp := range []string{"zlib", "zstd"} {
		add(bytesCase(comp+" cluster that does not inflate", qcow.ErrCorrupt, m64, []string{"-o", "compression_type=" + comp}, []string{"write -c -P 7 0 64k"},
			func(t *testing.T, b []byte) []byte {
				entry := be.Uint64(b[l2Offset(b):])
				host := int64(entry & (1<<54 - 1)) // 64 KiB clusters: 54 offset bits
				for i := host; i < min(host+64, int64(len(b))); i++ {
					b[i] ^= 0xa5
				}
				return b
			}))
	}
	extl2 := []string{"-o", "extended_l2=on"}
	add(bytesCase("extended L2: subcluster both allocated and zero", qcow.ErrCorrupt, m64, extl2, []string{"write 0 4k"},
		func(t *testing.T, b []byte) []byte { poke64(b, l2Offset(b)+8, 1|1<<32); return b }))
	add(bytesCase("extended L2: subclusters allocated in an unallocated cluster", qcow.ErrCorrupt, m64, extl2, []string{"write 64k 4k"},
		func(t *testing.T, b []byte) []byte { poke64(b, l2Offset(b)+8, 1); return b }))

	// Backing files.
	backed := func(name string, want error, f func(t *testing.T, dir string, b []byte) []byte) {
		add(fileCase(name, want, func(t *testing.T, dir string) string {
			qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
			top := qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "1M", "-b", "base.qcow2", "-F", "qcow2")
			b, err := os.ReadFile(top)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(top, f(t, dir, b), 0o644); err != nil {
				t.Fatal(err)
			}
			return top
		}))
	}
	backed("backing file name of 1024 bytes", qcow.ErrLimit, func(t *testing.T, dir string, b []byte) []byte {
		poke32(b, hdrBackingSize, 1024)
		return b
	})
	backed("backing file name outside the first cluster", qcow.ErrCorrupt, func(t *testing.T, dir string, b []byte) []byte {
		poke64(b, hdrBackingOffset, 65536-4)
		return b
	})
	backed("backing file name with a NUL byte", qcow.ErrCorrupt, func(t *testing.T, dir string, b []byte) []byte {
		b[be.Uint64(b[hdrBackingOffset:])+2] = 0
		return b
	})
	backed("backing format unknown", qcow.ErrUnsupported, func(t *testing.T, dir string, b []byte) []byte {
		copy(b[findExtension(t, b, 0xe2792aca):], "bogus")
		return b
	})
	backed("backing file missing", qcow.ErrBacking, func(t *testing.T, dir string, b []byte) []byte {
		os.Remove(filepath.Join(dir, "base.qcow2"))
		return b
	})
	backed("backing file corrupt", qcow.ErrCorrupt, func(t *testing.T, dir string, b []byte) []byte {
		base := filepath.Join(dir, "base.qcow2")
		bb, err := os.ReadFile(base)
		if err != nil {
			t.Fatal(err)
		}
		poke32(bb, hdrHeaderLength, 0xffffffff)
		if err := os.WriteFile(base, bb, 0o644); err != nil {
			t.Fatal(err)
		}
		return b
	})
	for _, name := range []string{"/etc/passwd", "../base.qcow2", "sub/../../base.qcow2", "rbd:pool/img", "nbd://host/x"} {
		add(fileCase("backing file outside the image's directory: "+name, qcow.ErrBacking, func(t *testing.T, dir string) string {
			return qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "1M", "-u", "-b", name, "-F", "raw")
		}))
	}
	add(corruptCase{name: "backing file and no opener", want: qcow.ErrBacking, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		qemutest.Create(t, "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
		f, err := qcow.OpenFile(qemutest.Create(t, "qcow2", filepath.Join(dir, "top.qcow2"), "1M", "-b", "base.qcow2", "-F", "qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		return f, qcow.Options{Untrusted: true}
	}})
	add(fileCase("backing loop a -> b -> a", qcow.ErrChain, func(t *testing.T, dir string) string {
		qemutest.Create(t, "qcow2", filepath.Join(dir, "b.qcow2"), "1M", "-u", "-b", "a.qcow2", "-F", "qcow2")
		return qemutest.Create(t, "qcow2", filepath.Join(dir, "a.qcow2"), "1M", "-u", "-b", "b.qcow2", "-F", "qcow2")
	}))
	add(fileCase("backing loop a -> a", qcow.ErrChain, func(t *testing.T, dir string) string {
		return qemutest.Create(t, "qcow2", filepath.Join(dir, "a.qcow2"), "1M", "-u", "-b", "a.qcow2", "-F", "qcow2")
	}))
	add(fileCase(fmt.Sprintf("chain of %d layers, deeper than DefaultMaxDepth", qcow.DefaultMaxDepth+1), qcow.ErrChain,
		func(t *testing.T, dir string) string { return makeChain(t, dir, qcow.DefaultMaxDepth+1) }))
	add(corruptCase{name: "chain of 5 layers, MaxDepth 4", want: qcow.ErrChain, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		f, err := qcow.OpenFile(makeChain(t, dir, 5))
		if err != nil {
			t.Fatal(err)
		}
		return f, qcow.Options{Untrusted: true, Open: qcow.DirOpener(false), MaxDepth: 4}
	}})

	// External data files.
	add(fileCase("external data file (untrusted)", qcow.ErrDataFile, func(t *testing.T, dir string) string {
		return qemutest.Create(t, "qcow2", filepath.Join(dir, "t.qcow2"), "1M", "-o", "data_file="+filepath.Join(dir, "t.data"))
	}))
	poke("external data file bit without a data file name", qcow.ErrDataFile, nil, func(b []byte) { b[hdrIncompatible+7] |= 1 << 2 })
	poke("raw external data bit without an external data file", qcow.ErrCorrupt, nil, func(b []byte) { b[hdrIncompatible+16+7] |= 1 << 1 })
	add(corruptCase{name: "compressed cluster in an image with an external data file", want: qcow.ErrCorrupt, open: func(t *testing.T, dir string) (qcow.File, qcow.Options) {
		img := qemutest.Create(t, "qcow2", filepath.Join(dir, "t.qcow2"), "1M", "-o", "data_file="+filepath.Join(dir, "t.data"))
		qemutest.IO(t, img, "write 0 64k")
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		poke64(b, l2Offset(b), 1<<62|0x30000)
		if err := os.WriteFile(img, b, 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := qcow.OpenFile(img)
		if err != nil {
			t.Fatal(err)
		}
		// Trusted: the data file is opened, the L2 entry is what is wrong.
		return f, qcow.Options{Open: qcow.DirOpener(true), OpenDataFile: qcow.DirOpener(true)}
	}})
	return cases
}

// makeChain makes a chain of n qcow2 layers in dir, layer i backed by layer
// i-1, and returns the top. qemu-img makes one overlay; the others are
// copies with the backing name patched, which is much faster than n runs of
// qemu-img.
func makeChain(t *testing.T, dir string, n int) string {
	t.Helper()
	name := func(i int) string { return fmt.Sprintf("layer%04d.qcow2", i) }
	qemutest.Create(t, "qcow2", filepath.Join(dir, name(0)), "1M")
	template := qemutest.Create(t, "qcow2", filepath.Join(dir, "template.qcow2"), "1M", "-u", "-b", name(0), "-F", "qcow2")
	b, err := os.ReadFile(template)
	if err != nil {
		t.Fatal(err)
	}
	nameAt := be.Uint64(b[hdrBackingOffset:])
	for i := 1; i < n; i++ {
		copy(b[nameAt:], name(i-1))
		if err := os.WriteFile(filepath.Join(dir, name(i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, name(n-1))
}

func TestRefuseCorrupt(t *testing.T) {
	for _, tc := range corruptCases() {
		t.Run(tc.name, func(t *testing.T) {
			f, opts := tc.open(t, t.TempDir())
			size := f.Size()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			c, err := qcow.Open(f, opts)
			runtime.ReadMemStats(&after)
			// Open allocates for the tables it keeps (the L1 table, bounded
			// by the file) and little else, whatever the header claims.
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > uint64(4*size+8<<20) {
				t.Errorf("Open allocated %d bytes for a file of %d bytes", alloc, size)
			}
			if err == nil {
				err = readEverything(c)
				c.Close()
			}
			if err == nil {
				t.Fatalf("accepted; want %v", tc.want)
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v; want %v", err, tc.want)
			}
			if strings.TrimSpace(err.Error()) == strings.TrimSpace(tc.want.Error()) {
				t.Errorf("error %q says nothing more than the sentinel", err)
			}
		})
	}
}

// readEverything reads the allocation map, Info and every byte of an image
// of up to 64 MiB, and returns the first error.
func readEverything(c *qcow.Chain) error {
	if c.Size() > 64<<20 {
		return fmt.Errorf("image of %d bytes: too big to read in a test", c.Size())
	}
	if _, err := c.Extents(0, c.Size()); err != nil {
		return err
	}
	if _, err := c.Info(); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(buf)) {
		if _, err := c.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

// TestCorruptButReadable: corruptions from iotests 060 that qemu still reads
// (read-only, no refcount is involved): we must read them exactly as qemu
// does, not refuse them.
func TestCorruptButReadable(t *testing.T) {
	cases := []struct {
		name    string
		cmds    []string
		corrupt func(b []byte) []byte
	}{
		{"060: L2 reference into L1", nil, func(b []byte) []byte {
			poke64(b, l1Offset(b), 1<<63|uint64(l1Offset(b)))
			return b
		}},
		{"060: cluster data reference into refcount block", nil, func(b []byte) []byte {
			l2 := int64(0x40000)
			b = append(b, make([]byte, l2+65536-int64(len(b)))...)
			poke64(b, l1Offset(b), 1<<63|uint64(l2))
			poke64(b, firstRefBlock(b)+8, 1<<48) // "mark cluster as used"
			poke64(b, l2, 1<<63|uint64(firstRefBlock(b)))
			return b
		}},
		{"060: incorrect refcount table offset (0)", []string{"write -P 3 0 64k"}, func(b []byte) []byte {
			poke64(b, hdrRefTableOffset, 0)
			return b
		}},
		// The two L2 entries of 080's "huge physical offset" (qemu fails to
		// make snapshots of these images, but reads them): data clusters
		// past the end of the file read as zeros.
		{"080: invalid L2 entry (huge physical offset 0xbfffffffffff0000)", []string{"write -P 9 0 128k"}, func(b []byte) []byte {
			poke64(b, l2Offset(b), 0xbfffffffffff0000)
			return b
		}},
		{"080: invalid L2 entry (huge physical offset 0x800000ffffff0000)", []string{"write -P 9 0 128k"}, func(b []byte) []byte {
			poke64(b, l2Offset(b), 0x800000ffffff0000)
			return b
		}},
		{"virtual size 65535: qemu reads whole sectors only (65024 bytes)", []string{"write -P 5 0 64k"}, func(b []byte) []byte {
			poke64(b, hdrSize, 65535)
			return b
		}},
		{"060: corrupt bit set: qemu reads it read-only", []string{"write -P 4 0 64k"}, func(b []byte) []byte {
			b[hdrIncompatible+7] |= 1 << 1
			return b
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			b := tc.corrupt(qemuImage(t, "64M", nil, tc.cmds...))
			path := filepath.Join(dir, "t.qcow2")
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := qcow.Open(qcow.BytesFile(path, b), qcow.Options{Untrusted: true})
			if err != nil {
				t.Fatalf("refused what qemu reads: %v", err)
			}
			defer c.Close()
			checkBytes(t, c, qemutest.ConvertRaw(t, path))
		})
	}
}

// TestDecompressBoundedMemory: a compressed cluster of a few bytes must not
// make the decompressor allocate what its header claims. A zstd frame
// header names a window of up to 3.75 TiB, or a content size of up to
// 2^64-1 bytes; the decoder allocates the window before it decodes a byte.
func TestDecompressBoundedMemory(t *testing.T) {
	rawBlock := func(n int) []byte { // the last block of a frame, stored raw
		h := uint32(1) | uint32(n)<<3
		return append([]byte{byte(h), byte(h >> 8), byte(h >> 16)}, make([]byte, n)...)
	}
	magic := []byte{0x28, 0xb5, 0x2f, 0xfd}
	frames := map[string][]byte{}
	for _, wlog := range []byte{27, 29, 31, 41} { // window descriptor: exponent - 10 in the high 5 bits
		frames[fmt.Sprintf("zstd window 2^%d", wlog)] = slices.Concat(magic, []byte{0x00, (wlog - 10) << 3}, rawBlock(16))
	}
	for _, size := range []uint64{1 << 30, 1 << 40, ^uint64(0)} { // single segment: the window is the content size
		frames[fmt.Sprintf("zstd content size %d", size)] = slices.Concat(magic, []byte{0xe0}, binary.LittleEndian.AppendUint64(nil, size), rawBlock(16))
	}
	for name, frame := range frames {
		t.Run(name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := qcow.DefaultDecompressor(qcow.CompressionZstd, make([]byte, 64<<10), frame)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, qcow.ErrCorrupt) {
				t.Errorf("got %v, want ErrCorrupt", err)
			}
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 16<<20 {
				t.Errorf("a %d-byte cluster made the decompressor allocate %d bytes", len(frame), alloc)
			}
		})
	}
}
