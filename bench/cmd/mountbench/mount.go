package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// mountWait bounds how long the mount may take to come up and to go away.
const mountWait = 20 * time.Second

// mountProc is a snapfs mount running in a child process.
type mountProc struct {
	cmd  *exec.Cmd
	dir  string        // the mount point, absolute
	log  string        // the child's stdout and stderr
	done chan struct{} // closed once the child has exited
}

// startMount mounts store on dir with snapfs mount in a child process and
// returns once the mount serves. A mount left on dir by a killed run is
// lazily unmounted first.
func startMount(ctx context.Context, snapfs, store, dir, logPath string) (*mountProc, error) {
	if mounted(dir) {
		if out, err := exec.Command("fusermount3", "-uz", dir).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%s is still mounted (by an earlier run?) and fusermount3 -uz failed: %v: %s", dir, err, out)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(snapfs, "mount", "--store", store, dir)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A group of its own: Ctrl-C on the terminal goes to the harness,
		// which unmounts after the command being measured has stopped.
		Setpgid: true,
		// Should the harness die without unmounting (kill -9), the mount
		// gets SIGTERM, on which snapfs unmounts itself.
		Pdeathsig: syscall.SIGTERM,
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	m := &mountProc{cmd: cmd, dir: dir, log: logPath, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(m.done)
	}()
	deadline := time.Now().Add(mountWait)
	for {
		select {
		case <-m.done:
			return nil, fmt.Errorf("snapfs mount exited: %v: %s", cmd.ProcessState, m.logTail())
		case <-ctx.Done():
			return nil, errors.Join(ctx.Err(), m.stop())
		case <-time.After(20 * time.Millisecond):
		}
		if mounted(dir) {
			if _, err := os.Stat(filepath.Join(dir, "volumes")); err == nil {
				return m, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(fmt.Errorf("snapfs mount: not mounted after %v: %s", mountWait, m.logTail()), m.stop())
		}
	}
}

// pid is the process id of the mount.
func (m *mountProc) pid() int { return m.cmd.Process.Pid }

// stop unmounts: SIGTERM to snapfs, which unmounts and exits; should it
// not within mountWait, a lazy unmount and SIGKILL. It fails only if the
// mount point is still mounted in the end.
func (m *mountProc) stop() error {
	select {
	case <-m.done:
	default:
		m.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-m.done:
		case <-time.After(mountWait):
			exec.Command("fusermount3", "-uz", m.dir).Run()
			m.cmd.Process.Kill()
			<-m.done
		}
	}
	// A killed snapfs leaves its mount behind ("transport endpoint is not
	// connected"): take it away.
	if mounted(m.dir) {
		exec.Command("fusermount3", "-uz", m.dir).Run()
	}
	if mounted(m.dir) {
		return fmt.Errorf("%s is still mounted: fusermount3 -u %s", m.dir, m.dir)
	}
	return nil
}

// logTail returns the end of the mount's log, for errors.
func (m *mountProc) logTail() string {
	data, _ := os.ReadFile(m.log)
	s := strings.TrimSpace(string(data))
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}

// mounted says whether dir is a mount point, from /proc/self/mountinfo:
// unlike stat, reading it never hangs on a dead FUSE server.
func mounted(dir string) bool {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMountinfo(fields[4]) == dir {
			return true
		}
	}
	return false
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of a path
// in /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
