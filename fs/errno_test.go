package fs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"

	"snapfs/qcow"
	"snapfs/snapshot"
)

func TestToErrno(t *testing.T) {
	tests := []struct {
		err     error
		want    syscall.Errno
		unknown bool
	}{
		{nil, 0, false},
		{fmt.Errorf("volume x: %w", snapshot.ErrNotFound), syscall.ENOENT, false},
		{fmt.Errorf("%w: s1", snapshot.ErrExists), syscall.EEXIST, false},
		{fmt.Errorf("%w: open files", snapshot.ErrBusy), syscall.EBUSY, false},
		{snapshot.ErrReadOnly, syscall.EROFS, false},
		{fmt.Errorf("%w: empty", snapshot.ErrInvalidName), syscall.EINVAL, false},
		{snapshot.ErrUnsupported, syscall.ENOTSUP, false},
		{fmt.Errorf("%w: extended L2", qcow.ErrUnsupported), syscall.ENOTSUP, false},
		{qcow.ErrEncrypted, syscall.ENOTSUP, false},
		{fmt.Errorf("%w: L1 past the end", qcow.ErrCorrupt), syscall.EINVAL, false},
		{qcow.ErrLimit, syscall.EINVAL, false},
		{qcow.ErrBacking, syscall.EINVAL, false},
		{qcow.ErrDataFile, syscall.EINVAL, false},
		// A refused import wraps ErrInvalid and the qcow sentinel: every
		// refused import is EINVAL.
		{&snapshot.ImportError{Msg: "encrypted", Err: qcow.ErrEncrypted}, syscall.EINVAL, false},
		{fmt.Errorf("merging: %w", context.Canceled), syscall.EINTR, false},
		{syscall.ENXIO, syscall.ENXIO, false},
		{&os.PathError{Op: "write", Path: "/store/x", Err: syscall.ENOSPC}, syscall.ENOSPC, false},
		// A store file that went missing is the store's fault: EIO.
		{&os.PathError{Op: "open", Path: "/store/layers/x", Err: syscall.ENOENT}, syscall.EIO, true},
		{errors.New("something odd"), syscall.EIO, true},
		// A backend that does not answer (rbdio wraps the errno and a
		// sentinel of its own): ETIMEDOUT, logged.
		{fmt.Errorf("rbd read rbd/vm@s at 0: %w", errors.Join(errors.New("rbdio: timed out"), syscall.ETIMEDOUT)), syscall.ETIMEDOUT, true},
		{fmt.Errorf("%w: volume x: %w", snapshot.ErrNotFound, syscall.ETIMEDOUT), syscall.ETIMEDOUT, true},
		// A backend that refuses the client (a Ceph key without the caps):
		// that errno, logged, never EIO.
		{fmt.Errorf("rbd open p1/vm: %w", errors.Join(errors.New("rbd: ret=-1"), syscall.EPERM)), syscall.EPERM, true},
		{&os.PathError{Op: "open", Path: "/store/layers/x", Err: syscall.EACCES}, syscall.EACCES, true},
		{syscall.EPERM, syscall.EPERM, false},
	}
	for _, tt := range tests {
		got, unknown := toErrno(tt.err)
		if got != tt.want || unknown != tt.unknown {
			t.Errorf("toErrno(%v) = %v, %v; want %v, %v", tt.err, got, unknown, tt.want, tt.unknown)
		}
	}
}
