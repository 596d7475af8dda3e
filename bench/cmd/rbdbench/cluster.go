package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// cluster is the test cluster of scripts/ceph/start.sh.
type cluster struct {
	ctx     context.Context
	scripts string
	dir     string
	conf    string // DIR/ceph.conf
}

// startCluster starts a fresh cluster in dir whose OSD advertises
// storeBytes. It is stopped by stop, or by the script's watchdog should
// this process die first.
func startCluster(ctx context.Context, scripts, dir string, storeBytes int64) (*cluster, error) {
	c := &cluster{ctx: ctx, scripts: scripts, dir: dir, conf: filepath.Join(dir, "ceph.conf")}
	cmd := exec.CommandContext(ctx, filepath.Join(scripts, "start.sh"), dir)
	cmd.Env = append(os.Environ(), "CEPH_OWNER_PID="+strconv.Itoa(os.Getpid()),
		"CEPH_STORE_BYTES="+strconv.FormatInt(storeBytes, 10), "CEPH_POOLS=rbd")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("starting the cluster: %v\n%s", err, stderr.String())
	}
	return c, nil
}

// stop stops the cluster, by the PIDs its script recorded.
func (c *cluster) stop() error {
	if out, err := exec.Command(filepath.Join(c.scripts, "stop.sh"), c.dir).CombinedOutput(); err != nil {
		return fmt.Errorf("stopping the cluster: %v\n%s", err, out)
	}
	return nil
}

// osdPID returns the process ID of the cluster's OSD, from the PID file
// its start script configured.
func (c *cluster) osdPID() (int, error) {
	data, err := os.ReadFile(filepath.Join(c.dir, "run", "osd.0.pid"))
	if err != nil {
		return 0, fmt.Errorf("the OSD's PID: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("the OSD's PID file: %w", err)
	}
	return pid, nil
}

// command returns a Ceph tool's command against the cluster.
func (c *cluster) command(tool string, args ...string) *exec.Cmd {
	return exec.CommandContext(c.ctx, tool, append([]string{"-c", c.conf}, args...)...)
}

// run runs a Ceph tool and returns its stdout.
func (c *cluster) run(tool string, args ...string) (string, error) {
	cmd := c.command(tool, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %v: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// importData creates image spec of size bytes of generated data (seed
// picks which) with rbd import from a pipe, and returns the SHA-256 of
// what it wrote.
func (c *cluster) importData(spec string, size int64, seed uint64) ([]byte, error) {
	cmd := c.command("rbd", "import", "--no-progress", "-", spec)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	h := sha256.New()
	_, werr := io.Copy(io.MultiWriter(in, h), io.LimitReader(newData(seed), size))
	in.Close()
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("rbd import %s: %v: %s", spec, err, strings.TrimSpace(stderr.String()))
	}
	if werr != nil {
		return nil, fmt.Errorf("rbd import %s: %w", spec, werr)
	}
	return h.Sum(nil), nil
}

// copyFlat writes what spec reads into a new image dst, which has no
// parent: rbd export piped into rbd import (rbd cp of a clone's snapshot
// copies the clone's own objects only).
func (c *cluster) copyFlat(spec, dst string) error {
	exp := c.command("rbd", "export", "--no-progress", spec, "-")
	imp := c.command("rbd", "import", "--no-progress", "-", dst)
	var expErr, impErr bytes.Buffer
	exp.Stderr, imp.Stderr = &expErr, &impErr
	pipe, err := exp.StdoutPipe()
	if err != nil {
		return err
	}
	imp.Stdin = pipe
	if err := exp.Start(); err != nil {
		return err
	}
	err = imp.Run()
	if werr := exp.Wait(); werr != nil {
		return fmt.Errorf("rbd export %s: %v: %s", spec, werr, strings.TrimSpace(expErr.String()))
	}
	if err != nil {
		return fmt.Errorf("rbd import %s: %v: %s", dst, err, strings.TrimSpace(impErr.String()))
	}
	return nil
}

// exportHash returns the SHA-256 of `rbd export SPEC -`, the oracle.
func (c *cluster) exportHash(spec string) ([]byte, error) {
	cmd := c.command("rbd", "export", "--no-progress", spec, "-")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	h := sha256.New()
	cmd.Stdout = h
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("rbd export %s: %v: %s", spec, err, strings.TrimSpace(stderr.String()))
	}
	return h.Sum(nil), nil
}

// fileHash returns the SHA-256 of the file at path.
func fileHash(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20) // FUSE's largest request
	if _, err := io.CopyBuffer(h, f, buf); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// data is an endless stream of incompressible bytes: RBD stores what it
// is given, and zeros would be holes that no reader fetches.
type data struct{ rng *rand.ChaCha8 }

func newData(seed uint64) io.Reader {
	var s [32]byte
	s[0], s[1] = byte(seed), byte(seed>>8)
	return data{rand.NewChaCha8(s)}
}

func (d data) Read(p []byte) (int, error) { return d.rng.Read(p) }
