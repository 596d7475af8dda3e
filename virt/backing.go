package virt

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// backingFile returns the backing file named in the header of the qcow2
// image at path, resolved against the image's directory as qemu does, or
// "" for an image without one (or a raw image). Only the header is read:
// the chains of libvirt domains are trusted (the domain's own files), and
// snapfs needs their shape, not their data.
func backingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var h [20]byte
	if _, err := io.ReadFull(f, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return "", nil // too short for qcow2: raw
		}
		return "", err
	}
	if string(h[:4]) != "QFI\xfb" {
		return "", nil
	}
	off := binary.BigEndian.Uint64(h[8:16])
	size := binary.BigEndian.Uint32(h[16:20])
	if off == 0 || size == 0 {
		return "", nil
	}
	if size > 1023 {
		return "", fmt.Errorf("%s: backing file name of %d bytes (qemu allows 1023)", path, size)
	}
	name := make([]byte, size)
	if _, err := f.ReadAt(name, int64(off)); err != nil {
		return "", fmt.Errorf("%s: backing file name: %w", path, err)
	}
	b := string(name)
	if !filepath.IsAbs(b) {
		b = filepath.Join(filepath.Dir(path), b)
	}
	return filepath.Clean(b), nil
}

// chainOf returns the files of the chain whose top is path, top first.
func chainOf(path string) ([]string, error) {
	var chain []string
	for p := path; p != ""; {
		if len(chain) > 1000 {
			return nil, fmt.Errorf("%s: backing chain longer than 1000 (a loop?)", path)
		}
		chain = append(chain, p)
		next, err := backingFile(p)
		if err != nil {
			return nil, err
		}
		p = next
	}
	return chain, nil
}
