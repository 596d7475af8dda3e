package snapshot

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"
)

// Open file description locks (F_OFD_*, Linux 3.15+): byte-range locks
// owned by an open file, not by a process. They conflict between two opens
// in one process as between two processes, vanish when the holder dies
// (kill -9 included), and are what qemu itself uses to lock images.
const (
	fOFDGetlk  = 36
	fOFDSetlk  = 37
	fOFDSetlkw = 38
)

// errLocked: the range is locked by another open file.
var errLocked = errors.New("locked")

// tryLock takes a lock (syscall.F_RDLCK or F_WRLCK) on [start, start+length)
// of f without waiting; errLocked when another open file holds a
// conflicting lock. length 0 means to the end of the file and beyond.
func tryLock(f *os.File, typ int16, start, length int64) error {
	lk := syscall.Flock_t{Type: typ, Whence: 0, Start: start, Len: length}
	err := syscall.FcntlFlock(f.Fd(), fOFDSetlk, &lk)
	if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) {
		return errLocked
	}
	return err
}

// lockWait takes a lock like tryLock, waiting (politely, by polling) until
// it is free or ctx is done. Polling rather than F_OFD_SETLKW: a blocked
// fcntl cannot be cancelled, and contention between processes on one store
// is rare and short.
func lockWait(ctx context.Context, f *os.File, typ int16, start, length int64) error {
	delay := time.Millisecond
	for {
		err := tryLock(f, typ, start, length)
		if err != errLocked {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// unlock releases [start, start+length) of f.
func unlock(f *os.File, start, length int64) error {
	lk := syscall.Flock_t{Type: syscall.F_UNLCK, Whence: 0, Start: start, Len: length}
	return syscall.FcntlFlock(f.Fd(), fOFDSetlk, &lk)
}

// qemu locks bytes 100 to 299 of every image it opens (one byte per
// permission it holds or refuses to share: file-posix.c, RAW_LOCK_PERM_BASE
// and RAW_LOCK_SHARED_BASE), with OFD locks.
const (
	qemuLockStart = 100
	qemuLockLen   = 200
)

// openByQemu reports whether a qemu process (a VM, qemu-io, qemu-img,
// qemu-nbd) has the image at path open, from the locks qemu takes. An image
// opened with locking=off cannot be seen.
func openByQemu(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: qemuLockStart, Len: qemuLockLen}
	if err := syscall.FcntlFlock(f.Fd(), fOFDGetlk, &lk); err != nil {
		return false, err
	}
	return lk.Type != syscall.F_UNLCK, nil
}

// fileID identifies one version of a file replaced by rename: the inode
// changes with every replacement, the size and mtime almost surely too.
type fileID struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

func statID(path string) (fileID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return fileID{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano()}, nil
}

// allocatedBytes returns the bytes a file takes on disk (st_blocks).
func allocatedBytes(path string) (int64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return st.Blocks * 512, nil
}
