package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// foreignSignatures are the marks, at the start of a file, of the image
// formats qemu reads besides raw and qcow2, as qemu's own probes find them
// (block/*.c): a file that has one is that format, and read as raw it
// would give the format's metadata as the guest's disk.
var foreignSignatures = []struct {
	format string
	off    int64
	magic  string
}{
	{"VMDK", 0, "KDMV"},
	{"VMDK", 0, "COWD"},
	{"VMDK (descriptor)", 0, "# Disk DescriptorFile"},
	{"VHDX", 0, "vhdxfile"},
	{"VHD (vpc)", 0, "conectix"},
	{"VDI", 0x40, "\x7f\x10\xda\xbe"},
	{"QED", 0, "QED\x00"},
	{"Parallels", 0, "WithoutFreeSpace"},
	{"Parallels", 0, "WithouFreSpacExt"},
	{"Bochs", 0, "Bochs Virtual HD Image"},
	{"cloop", 0, "#!/bin/sh\n#V2.0 Format\n"},
	{"LUKS", 0, "LUKS\xba\xbe"},
}

// checkNotForeign returns an error wrapping ErrForeign (ErrEncrypted for
// LUKS) if r, probed as raw, starts with the signature of another format.
func checkNotForeign(r io.ReaderAt) error {
	var head [0x44]byte
	n, err := r.ReadAt(head[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	for _, s := range foreignSignatures {
		end := s.off + int64(len(s.magic))
		if end > int64(n) || !bytes.Equal(head[s.off:end], []byte(s.magic)) {
			continue
		}
		if s.format == "LUKS" {
			return fmt.Errorf("%w: a LUKS volume", ErrEncrypted)
		}
		return fmt.Errorf("%w: it is a %s image", ErrForeign, s.format)
	}
	return nil
}
