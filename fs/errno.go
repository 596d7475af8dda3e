package fs

import (
	"context"
	"errors"
	"syscall"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// errnoOf maps the model's and qcow's sentinels to errnos. Order matters
// only where one error could wrap two sentinels: the first match wins.
var errnoOf = []struct {
	err   error
	errno syscall.Errno
}{
	{snapshot.ErrNotFound, syscall.ENOENT},
	{snapshot.ErrExists, syscall.EEXIST},
	{snapshot.ErrBusy, syscall.EBUSY},
	{snapshot.ErrReadOnly, syscall.EROFS},
	{snapshot.ErrInvalidName, syscall.EINVAL},
	{snapshot.ErrInvalid, syscall.EINVAL},
	{snapshot.ErrUnsupported, syscall.ENOTSUP},

	// An image we do not read (an unknown feature, encryption) is
	// "not supported"; one that is broken or not allowed (corrupt,
	// beyond limits, a backing file or an external data file, which an
	// import refuses) is "invalid". cp shows only the errno's text; the
	// log line has the whole message, with what to do.
	{qcow.ErrUnsupported, syscall.ENOTSUP},
	{qcow.ErrEncrypted, syscall.ENOTSUP},
	{qcow.ErrCorrupt, syscall.EINVAL},
	{qcow.ErrLimit, syscall.EINVAL},
	{qcow.ErrBacking, syscall.EINVAL},
	{qcow.ErrChain, syscall.EINVAL},
	{qcow.ErrDataFile, syscall.EINVAL},
}

// toErrno is the one errno mapping of the filesystem. It returns 0 for
// nil; unknown is true when the error is not the caller's doing, so that
// the caller logs it (see filesystem.errno): err matched nothing and became
// EIO, or a backend did not answer in time.
//
// A bare syscall.Errno passes through: this package returns those itself,
// on purpose (ENXIO for SEEK_DATA past the data, EROFS on a read-only
// mount). A system error wrapped deeper (an *os.PathError from a store
// file) passes only if it means the same to the caller as to us, a full
// disk while an import is written; any other (ENOENT on a layer file, say)
// is a fault of the store, not of the request, and becomes EIO.
//
// A backend that did not answer in time (a Ceph cluster down: rbdio's
// errors wrap syscall.ETIMEDOUT) gives ETIMEDOUT, whatever else the error
// wraps: the caller learns that trying again later may work, which EIO
// would not say. One that refused (EPERM, EACCES) gives that errno.
func toErrno(err error) (errno syscall.Errno, unknown bool) {
	if err == nil {
		return 0, false
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return syscall.EINTR, false
	}
	if errors.Is(err, syscall.ETIMEDOUT) {
		return syscall.ETIMEDOUT, true
	}
	// A backend that refuses this client (a Ceph key whose caps do not
	// allow the operation, as rbd says: "Operation not permitted") gives
	// that errno, not EIO, which would say the data is broken; logged
	// (unless it is the bare errno this package returns), because the log
	// says which operation on which image.
	for _, e := range []syscall.Errno{syscall.EPERM, syscall.EACCES} {
		if errors.Is(err, e) {
			return e, err != error(e)
		}
	}
	for _, m := range errnoOf {
		if errors.Is(err, m.err) {
			return m.errno, false
		}
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		switch e {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			// Wherever it comes from, a full disk is a full disk.
			return e, false
		}
		if err == error(e) {
			return e, false
		}
	}
	return syscall.EIO, true
}
