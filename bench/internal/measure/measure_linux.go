package measure

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Evict drops the clean page-cache pages of one file (posix_fadvise
// POSIX_FADV_DONTNEED). Unlike DropCaches it
// needs no root, and it leaves every other file's pages where they are: the
// benchmarks use it to make a FUSE file read through the filesystem again
// while the files under it stay cached.
func Evict(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	const fadvDontNeed = 4
	_, _, errno := syscall.Syscall6(syscall.SYS_FADVISE64, f.Fd(), 0, 0, fadvDontNeed, 0, 0)
	if errno != 0 {
		return &fs.PathError{Op: "fadvise", Path: path, Err: errno}
	}
	return nil
}

// ErrNoProcess is returned for the peak RSS of a process that is gone.
var ErrNoProcess = errors.New("measure: no such process")

// PeakRSS returns the peak resident set (VmHWM) of a running process, in
// KiB: for a long-lived child such as a FUSE server, whose rusage comes
// only when it exits.
func PeakRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("%w: %d", ErrNoProcess, pid)
		}
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if v, ok := bytes.CutPrefix(sc.Bytes(), []byte("VmHWM:")); ok {
			v = bytes.TrimSpace(bytes.TrimSuffix(bytes.TrimSpace(v), []byte("kB")))
			return strconv.ParseInt(string(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no VmHWM", pid)
}

// userHZ is the unit of the CPU times in /proc/PID/stat: USER_HZ, 100 on
// every Linux architecture.
const userHZ = 100

// ProcessCPU returns the user and system CPU time that a running process
// (all its threads) has used so far, from /proc/PID/stat: the difference
// of two calls is what a long-lived process (a FUSE server, a Ceph OSD)
// spent on one run.
func ProcessCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("%w: %d", ErrNoProcess, pid)
		}
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: the fields
	// count from after its closing one. utime and stime are fields 14
	// and 15 of the line, 12 and 13 after the name.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after the name, want 13 or more", pid, len(fields))
	}
	var ticks int64
	for _, f := range fields[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// ResetPeakRSS sets the peak resident set of a process back to its current
// resident set (Linux 4.0 and later), so that PeakRSS then measures one
// phase of a long-lived process. The caller must own the process.
func ResetPeakRSS(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5\n"), 0o200)
}

// SyncFS flushes the filesystem that holds path (syncfs(2)): for a
// command whose output is more than one file, such as an import into a
// store.
func SyncFS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, _, errno := syscall.Syscall(sysSyncfs, f.Fd(), 0, 0); errno != 0 {
		return &fs.PathError{Op: "syncfs", Path: path, Err: errno}
	}
	return nil
}
