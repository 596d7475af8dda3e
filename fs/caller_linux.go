package fs

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"
)

// The kernel flag of a task that has begun to exit (include/linux/sched.h).
const pfExiting = 0x4

// callerDying reports whether the thread pid, the caller of a FUSE request,
// is being killed. The kernel turns a fatal signal into a pending SIGKILL on
// every thread of the process (complete_signal), so a pending SIGKILL is
// what dying looks like from outside, whatever signal it was; a thread
// already exiting after a signal counts too.
func callerDying(pid int) bool {
	if pid <= 0 {
		return false
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		// Gone already: nobody is waiting for the answer.
		return os.IsNotExist(err)
	}
	const sigkill = 1 << (9 - 1)
	for _, line := range strings.Split(string(status), "\n") {
		name, value, ok := strings.Cut(line, ":")
		if !ok || (name != "SigPnd" && name != "ShdPnd") {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(value), 16, 64)
		if err == nil && mask&sigkill != 0 {
			return true
		}
	}
	failed, _ := callerExitFailed(pid)
	return failed
}

// callerExitFailed reports whether the thread pid is exiting after a failure:
// killed by a signal, or exiting with a non-zero status. A FLUSH sent while
// a process exits closes the files it left open; when it failed (cp
// interrupted by ^C, killed, out of space), what it wrote is not a whole
// image and must not be imported. how says what happened, for the log.
//
// The kernel sets the exit code before it closes the files (do_exit), and
// shows both in /proc/PID/stat: flags is field 9, exit_code field 52.
func callerExitFailed(pid int) (failed bool, how string) {
	if pid <= 0 {
		return false, ""
	}
	stat, ok := readProcStat(pid)
	if !ok {
		return false, ""
	}
	// The command name (field 2) is in parentheses and may hold spaces
	// or parentheses itself: fields are counted after the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return false, ""
	}
	fields := strings.Fields(string(stat[i+1:]))
	const first = 3 // fields[0] is field 3, the state
	if len(fields) <= 52-first {
		return false, ""
	}
	flags, err1 := strconv.ParseUint(fields[9-first], 10, 64)
	code, err2 := strconv.ParseInt(fields[52-first], 10, 64)
	if err1 != nil || err2 != nil || flags&pfExiting == 0 {
		return false, ""
	}
	// code is a wait status: the signal in the low 7 bits, else the exit
	// status in the next 8.
	if sig := code & 0x7f; sig != 0 {
		return true, "killed by signal " + strconv.FormatInt(sig, 10)
	}
	if status := code >> 8 & 0xff; status != 0 {
		return true, "exited with status " + strconv.FormatInt(status, 10)
	}
	return false, ""
}

// procStatWait bounds the wait for /proc/PID/stat. The kernel makes that
// read wait while the process is in execve, and an exec that closes a
// close-on-exec descriptor of a snapfs file waits for snapfs to answer
// its FLUSH: waiting longer would hang both for good.
const procStatWait = time.Second

// readProcStat returns /proc/PID/stat, or false if it cannot be read, or
// not within procStatWait: then pid is exec'ing, which is no failure. The
// read left behind ends with the exec, once the FLUSH is answered.
func readProcStat(pid int) ([]byte, bool) {
	type result struct {
		stat []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		done <- result{stat, err}
	}()
	timer := time.NewTimer(procStatWait)
	defer timer.Stop()
	select {
	case r := <-done:
		return r.stat, r.err == nil
	case <-timer.C:
		return nil, false
	}
}
