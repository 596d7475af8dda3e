//go:build ceph && cgo

package rbdio

import (
	"errors"
	"fmt"
	"syscall"

	"snapfs/snapshot"
)

// Sentinels of the package, on top of those of package snapshot.
var (
	// ErrTimeout: the cluster did not answer within Config.Timeout (a
	// monitor or an OSD is down or unreachable). Errors that wrap it wrap
	// syscall.ETIMEDOUT too.
	ErrTimeout = errors.New("rbdio: the Ceph cluster did not answer in time")
	// ErrConfig: the connection could not be set up from the configuration
	// (no ceph.conf, no keyring, an unknown pool).
	ErrConfig = errors.New("rbdio: bad Ceph configuration")
)

// Error is a librados or librbd call that failed. It wraps the go-ceph
// error, the errno, and the snapshot sentinel (or ErrTimeout) that the
// errno means, so that errors.Is(err, snapshot.ErrNotFound) and
// errors.Is(err, syscall.ENOENT) both work.
type Error struct {
	// Op is what was being done, with the image: "snap create rbd/vm@s1".
	Op string
	// Errno is the positive errno librbd returned.
	Errno syscall.Errno
	// Err is the error go-ceph returned.
	Err error
}

// Error returns "rbd OP: cause".
func (e *Error) Error() string { return fmt.Sprintf("rbd %s: %v", e.Op, e.Err) }

// Unwrap returns the go-ceph error, the errno and what it means.
func (e *Error) Unwrap() []error {
	out := []error{e.Err}
	if e.Errno != 0 {
		out = append(out, e.Errno)
	}
	if s := sentinelOf(e.Errno); s != nil {
		out = append(out, s)
	}
	return out
}

// sentinelOf maps an errno from librbd to what it means in the model.
func sentinelOf(errno syscall.Errno) error {
	switch errno {
	case syscall.ENOENT:
		return snapshot.ErrNotFound
	case syscall.EEXIST:
		return snapshot.ErrExists
	case syscall.EBUSY, syscall.ENOTEMPTY:
		// EBUSY: a watcher (a VM) has the image open, or a protected
		// snapshot has children; ENOTEMPTY: the image still has snapshots.
		return snapshot.ErrBusy
	case syscall.EROFS:
		return snapshot.ErrReadOnly
	case syscall.EINVAL, syscall.ERANGE:
		return snapshot.ErrInvalid
	case syscall.EOPNOTSUPP, syscall.ENOSYS:
		return snapshot.ErrUnsupported
	case syscall.ETIMEDOUT:
		return ErrTimeout
	}
	return nil
}

// codeError is what go-ceph's errors implement.
type codeError interface{ ErrorCode() int }

// wrap turns an error from go-ceph into an *Error naming op; nil stays nil.
func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	e := &Error{Op: op, Err: err}
	var ce codeError
	if errors.As(err, &ce) {
		code := ce.ErrorCode()
		if code < 0 {
			code = -code
		}
		e.Errno = syscall.Errno(code)
	}
	return e
}

// denied says whether err is the cluster refusing this client (its caps
// do not allow the operation): EPERM from librados and librbd, or EACCES.
func denied(err error) bool {
	return errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) ||
		errnoOf(err) == syscall.EPERM || errnoOf(err) == syscall.EACCES
}

// errnoOf returns the errno of an error from go-ceph (0 if it has none).
func errnoOf(err error) syscall.Errno {
	var ce codeError
	if errors.As(err, &ce) {
		code := ce.ErrorCode()
		if code < 0 {
			code = -code
		}
		return syscall.Errno(code)
	}
	return 0
}
