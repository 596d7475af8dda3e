package snapshot

import (
	"fmt"
	"os"
	"syscall"
)

// noWriters returns nil if no open file, in any process, can write to f,
// which must be open read-only: the kernel grants a read lease only then
// (fcntl F_SETLEASE). The lease is given back at once: it is the question
// that matters, and a lease held would make other opens wait. A
// filesystem without leases answers with an error too, and the caller
// then does without what needed the answer.
func noWriters(f *os.File) error {
	fd := int(f.Fd())
	if _, err := fcntl(fd, syscall.F_SETLEASE, syscall.F_RDLCK); err != nil {
		return fmt.Errorf("%s: open for writing elsewhere, or no leases on its filesystem: %w", f.Name(), err)
	}
	_, err := fcntl(fd, syscall.F_SETLEASE, syscall.F_UNLCK)
	return err
}

// fcntl is fcntl(2) with an integer argument.
func fcntl(fd, cmd, arg int) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), uintptr(cmd), uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}
