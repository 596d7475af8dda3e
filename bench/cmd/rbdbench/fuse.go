package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// mountWait bounds how long a mount may take to come up and to go away.
const mountWait = 30 * time.Second

// fuseProc is a FUSE server (snapfs mount, rbd-fuse -f) in a child
// process, serving dir.
type fuseProc struct {
	cmd  *exec.Cmd
	dir  string
	log  strings.Builder
	done chan struct{} // closed once the child has exited
}

// startFuse starts cmd, a FUSE server in the foreground that mounts dir,
// and returns once ready (a path below dir) exists.
func startFuse(cmd *exec.Cmd, dir, ready string) (*fuseProc, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	m := &fuseProc{cmd: cmd, dir: dir, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = &m.log, &m.log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A group of its own: Ctrl-C on the terminal goes to the harness,
		// which unmounts after the command being measured has stopped.
		Setpgid: true,
		// Should the harness die without unmounting, the server gets
		// SIGTERM, on which both servers unmount.
		Pdeathsig: syscall.SIGTERM,
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		cmd.Wait()
		close(m.done)
	}()
	deadline := time.Now().Add(mountWait)
	for {
		select {
		case <-m.done:
			return nil, fmt.Errorf("%s exited: %v: %s", cmd.Args[0], cmd.ProcessState, m.log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if mounted(dir) {
			if _, err := os.Stat(ready); err == nil {
				return m, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(fmt.Errorf("%s: %s not there after %v", cmd.Args[0], ready, mountWait), m.stop())
		}
	}
}

// pid is the process id of the server.
func (m *fuseProc) pid() int { return m.cmd.Process.Pid }

// stop unmounts (fusermount3 -u; the server then exits) and waits for the
// server; should it not exit within mountWait, a lazy unmount and SIGKILL.
// It fails only if dir is still mounted in the end.
func (m *fuseProc) stop() error {
	exec.Command("fusermount3", "-u", m.dir).Run()
	select {
	case <-m.done:
	case <-time.After(mountWait):
		exec.Command("fusermount3", "-uz", m.dir).Run()
		m.cmd.Process.Kill()
		<-m.done
	}
	if mounted(m.dir) {
		exec.Command("fusermount3", "-uz", m.dir).Run()
	}
	if mounted(m.dir) {
		return fmt.Errorf("%s is still mounted: fusermount3 -u %s", m.dir, m.dir)
	}
	return nil
}

// mounted reports whether something is mounted on dir.
func mounted(dir string) bool {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}
