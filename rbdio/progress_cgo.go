//go:build ceph && cgo

package rbdio

// go-ceph has no flatten or rollback with progress: these call librbd's
// rbd_flatten_with_progress and rbd_snap_rollback_with_progress on an image
// handle of their own.

/*
#cgo LDFLAGS: -lrbd
#include <stdint.h>
#include <stdlib.h>
#include <rbd/librbd.h>

extern int snapfsProgress(uint64_t done, uint64_t total, void *arg);

static int snapfs_flatten(rados_ioctx_t io, const char *name, uintptr_t handle) {
	rbd_image_t img;
	int r = rbd_open(io, name, &img, NULL);
	if (r < 0)
		return r;
	r = rbd_flatten_with_progress(img, snapfsProgress, (void *)handle);
	int c = rbd_close(img);
	return r < 0 ? r : c;
}

static int snapfs_rollback(rados_ioctx_t io, const char *name, const char *snap, uintptr_t handle) {
	rbd_image_t img;
	int r = rbd_open(io, name, &img, NULL);
	if (r < 0)
		return r;
	r = rbd_snap_rollback_with_progress(img, snap, snapfsProgress, (void *)handle);
	int c = rbd_close(img);
	return r < 0 ? r : c;
}
*/
import "C"

import (
	"context"
	"runtime/cgo"
	"sync"
	"syscall"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
)

// progress is what a librbd progress callback reaches through its handle.
type progress struct {
	ctx    context.Context
	report func(done, total int64)

	mu          sync.Mutex // protects done, total
	done, total int64
}

//export snapfsProgress
func snapfsProgress(done, total C.uint64_t, arg unsafe.Pointer) C.int {
	pr := cgo.Handle(uintptr(arg)).Value().(*progress)
	pr.mu.Lock()
	pr.done, pr.total = int64(done), int64(total)
	pr.mu.Unlock()
	if pr.report != nil {
		pr.report(int64(done), int64(total))
	}
	// librbd stops the operation (safely: flatten and rollback can be run
	// again) when the callback returns an error.
	if pr.ctx.Err() != nil {
		return -C.int(syscall.ECANCELED)
	}
	return 0
}

// errnoError is a librbd return code, as go-ceph's errors are.
type errnoError int

func (e errnoError) Error() string  { return syscall.Errno(-e).Error() }
func (e errnoError) ErrorCode() int { return int(e) }
func (e errnoError) Unwrap() error  { return syscall.Errno(-e) }
func codeErr(r C.int) error {
	if r >= 0 {
		return nil
	}
	return errnoError(r)
}

// finish reports the end of a successful operation: librbd reports the
// objects it starts, so the last report it makes is short of the total.
func (pr *progress) finish(err error) error {
	pr.mu.Lock()
	done, total := pr.done, pr.total
	pr.mu.Unlock()
	if err == nil && pr.report != nil && done < total {
		pr.report(total, total)
	}
	return err
}

// flattenImage runs rbd flatten on image name of io.
func flattenImage(ctx context.Context, io *rados.IOContext, name string, report func(done, total int64)) error {
	pr := &progress{ctx: ctx, report: report}
	h := cgo.NewHandle(pr)
	defer h.Delete()
	cName := C.CString(name)
	defer C.free(unsafe.Pointer(cName))
	return pr.finish(codeErr(C.snapfs_flatten(C.rados_ioctx_t(io.Pointer()), cName, C.uintptr_t(h))))
}

// rollbackImage runs rbd snap rollback on image name of io to snap.
func rollbackImage(ctx context.Context, io *rados.IOContext, name, snap string, report func(done, total int64)) error {
	pr := &progress{ctx: ctx, report: report}
	h := cgo.NewHandle(pr)
	defer h.Delete()
	cName := C.CString(name)
	defer C.free(unsafe.Pointer(cName))
	cSnap := C.CString(snap)
	defer C.free(unsafe.Pointer(cSnap))
	return pr.finish(codeErr(C.snapfs_rollback(C.rados_ioctx_t(io.Pointer()), cName, cSnap, C.uintptr_t(h))))
}
