package qcow

import (
	"errors"
	"syscall"

	"golang.org/x/sys/unix"
)

// dataAt implements holeFinder with SEEK_DATA and SEEK_HOLE.
func (f *osFile) dataAt(off int64) (start, end int64, err error) {
	fd := int(f.Fd())
	start, err = syscall.Seek(fd, off, unix.SEEK_DATA)
	if errors.Is(err, syscall.ENXIO) {
		return f.size, f.size, nil // only a hole from off to the end
	}
	if err != nil {
		return 0, 0, err
	}
	if start > off {
		return start, start, nil
	}
	end, err = syscall.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, err
	}
	return start, end, nil
}
