package main

import (
	"os"
	"syscall"
	"unsafe"
)

// isTerminal reports whether f is a terminal. It asks for the terminal
// attributes (TCGETS) instead of checking for a character device: /dev/null
// is a character device too, and a bar drawn there would be wasted work.
func isTerminal(f *os.File) bool {
	var t syscall.Termios
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), uintptr(syscall.TCGETS), uintptr(unsafe.Pointer(&t)))
	return errno == 0
}

// currentUmask returns the process umask. The kernel only reports it by
// setting it, so it is set and put back at once; snapfs calls this before
// starting goroutines that create files.
func currentUmask() os.FileMode {
	old := syscall.Umask(0o022)
	syscall.Umask(old)
	return os.FileMode(old)
}
