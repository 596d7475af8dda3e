// Package fuseproc runs a FUSE server (snapfs mount, rbd-fuse -f) in a
// child process for the benchmarks: it starts it, waits until the mount
// serves, and always takes the mount away again, also when the server
// hangs or dies.
package fuseproc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Wait bounds how long a mount may take to come up and to go away.
const Wait = 30 * time.Second

// Proc is a FUSE server in a child process, serving Dir.
type Proc struct {
	cmd  *exec.Cmd
	dir  string        // the mount point
	log  string        // the child's stdout and stderr
	done chan struct{} // closed once the child has exited
}

// Start starts cmd, a FUSE server that runs in the foreground and mounts
// dir, with its output in logPath, and returns once ready (a path below
// dir) exists. A mount left on dir by a killed run is lazily unmounted
// first.
func Start(ctx context.Context, cmd *exec.Cmd, dir, ready, logPath string) (*Proc, error) {
	if Mounted(dir) {
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
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A group of its own: Ctrl-C on the terminal goes to the harness,
		// which unmounts after the command being measured has stopped.
		Setpgid: true,
		// Should the harness die without unmounting (kill -9), the server
		// gets SIGTERM, on which snapfs and rbd-fuse unmount.
		Pdeathsig: syscall.SIGTERM,
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{cmd: cmd, dir: dir, log: logPath, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	deadline := time.Now().Add(Wait)
	for {
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s exited: %v: %s", cmd.Args[0], cmd.ProcessState, p.LogTail())
		case <-ctx.Done():
			return nil, errors.Join(ctx.Err(), p.Stop())
		case <-time.After(20 * time.Millisecond):
		}
		if Mounted(dir) {
			if _, err := os.Stat(ready); err == nil {
				return p, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(fmt.Errorf("%s: %s not there after %v: %s", cmd.Args[0], ready, Wait, p.LogTail()), p.Stop())
		}
	}
}

// Dir is the mount point.
func (p *Proc) Dir() string { return p.dir }

// PID is the process id of the server.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Stop unmounts (fusermount3 -u; the server then exits) and waits for the
// server; should it not exit within Wait, a lazy unmount and SIGKILL. It
// fails only if the mount point is still mounted in the end.
func (p *Proc) Stop() error {
	select {
	case <-p.done:
	default:
		exec.Command("fusermount3", "-u", p.dir).Run()
		select {
		case <-p.done:
		case <-time.After(Wait):
			exec.Command("fusermount3", "-uz", p.dir).Run()
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	// A killed server leaves its mount behind ("transport endpoint is not
	// connected"): take it away.
	if Mounted(p.dir) {
		exec.Command("fusermount3", "-uz", p.dir).Run()
	}
	if Mounted(p.dir) {
		return fmt.Errorf("%s is still mounted: fusermount3 -u %s", p.dir, p.dir)
	}
	return nil
}

// LogTail returns the end of the server's output, for errors.
func (p *Proc) LogTail() string {
	data, _ := os.ReadFile(p.log)
	s := strings.TrimSpace(string(data))
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}

// Mounted says whether dir is a mount point, from /proc/self/mountinfo:
// unlike stat, reading it never hangs on a dead FUSE server.
func Mounted(dir string) bool {
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
