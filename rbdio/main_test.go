//go:build ceph && cgo

package rbdio

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// The tests run against a real cluster: the one SNAPFS_CEPH_CONF names (a
// throwaway one: the tests create pools and change
// require_min_compat_client), or one that TestMain starts with the
// project's scripts/ceph/start.sh in a temp dir and stops at the end.
var (
	cephConf string // the ceph.conf of the test cluster
	testPool = "rbd"
	cluster  *Cluster // opened on testPool by TestMain
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	cephConf = os.Getenv("SNAPFS_CEPH_CONF")
	if cephConf == "" {
		dir, err := os.MkdirTemp("", "snapfs-ceph-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		start := exec.Command("../scripts/ceph/start.sh", dir)
		// If this binary dies before it stops the cluster (a panic, a
		// test timeout), the script's watchdog stops it.
		start.Env = append(os.Environ(), "CEPH_OWNER_PID="+strconv.Itoa(os.Getpid()))
		start.Stderr = os.Stderr
		if out, err := start.Output(); err != nil {
			fmt.Fprintf(os.Stderr, "starting the test cluster: %v\n%s", err, out)
			exec.Command("../scripts/ceph/stop.sh", dir).Run()
			return 1
		}
		defer func() {
			stop := exec.Command("../scripts/ceph/stop.sh", dir)
			stop.Stderr = os.Stderr
			if err := stop.Run(); err != nil {
				fmt.Fprintf(os.Stderr, "stopping the test cluster: %v\n", err)
			}
		}()
		cephConf = filepath.Join(dir, "ceph.conf")
	}
	var err error
	cluster, err = Open(Config{CephConf: cephConf, Pools: []string{testPool}, Timeout: 30 * time.Second})
	if err != nil {
		fmt.Fprintf(os.Stderr, "connecting to the test cluster: %v\n", err)
		return 1
	}
	defer cluster.Close()
	return m.Run()
}

// pool returns the test pool.
func pool() *Pool { return cluster.Pools()[0] }

// uniqueName returns a volume name no other test uses.
func uniqueName(t testing.TB, what string) string {
	var b [4]byte
	rand.Read(b[:])
	return what + "-" + hex.EncodeToString(b[:])
}

// cli runs a Ceph command line tool against the test cluster and returns
// its stdout.
func cli(t *testing.T, tool string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(tool, append([]string{"-c", cephConf}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// rbdExport returns the bytes of `rbd export SPEC -`, the oracle.
func rbdExport(t *testing.T, spec string) []byte {
	t.Helper()
	return cli(t, "rbd", "export", "--no-progress", spec, "-")
}

// rbdDiff returns `rbd diff` of spec as extents (offset, length, exists).
func rbdDiff(t *testing.T, args ...string) []diffExtent {
	t.Helper()
	var out []diffExtent
	if err := json.Unmarshal(cli(t, "rbd", append([]string{"diff", "--format", "json"}, args...)...), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

type diffExtent struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Exists string `json:"exists"`
}

// writer opens image name of the test pool read-write through a
// connection of its own, as another client (a VM) would: it is a
// watcher that is not us.
func writer(t testing.TB, name string) *rbd.Image {
	t.Helper()
	conn, err := rados.NewConnWithUser("admin")
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.ReadConfigFile(cephConf); err != nil {
		t.Fatal(err)
	}
	conn.SetConfigOption("err_to_stderr", "false")
	// A VM has no timeouts, but a test must not hang.
	for _, o := range []string{"rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"} {
		conn.SetConfigOption(o, "30")
	}
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	io, err := conn.OpenIOContext(testPool)
	if err != nil {
		t.Fatal(err)
	}
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Closing waits for librbd to release the exclusive lock: bound
		// it, so that a bug shows as a failure, not as a hung test.
		closed := make(chan struct{})
		go func() {
			img.Close()
			close(closed)
		}()
		select {
		case <-closed:
			io.Destroy()
			conn.Shutdown()
		case <-time.After(time.Minute):
			t.Errorf("closing the writer of %s hung", name)
		}
	})
	return img
}

// writeAt writes b at off through img and flushes.
func writeAt(t *testing.T, img *rbd.Image, b []byte, off int64) {
	t.Helper()
	if _, err := img.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
}

// randomBytes returns n random bytes.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// runDir returns the run directory of the test cluster (where its PID
// files are), from ceph.conf as scripts/ceph/start.sh writes it.
func runDir(t *testing.T) string {
	t.Helper()
	f, err := os.Open(cephConf)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.TrimSpace(k) == "run dir" {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("%s has no 'run dir': these tests need a cluster started by scripts/ceph/start.sh", cephConf)
	return ""
}

// ctx is the context of a test.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}

// tempPool creates an RBD pool named after prefix, removed when the test
// ends, and returns its name.
func tempPool(t *testing.T, prefix string) string {
	t.Helper()
	name := uniqueName(t, prefix)
	cli(t, "ceph", "osd", "pool", "create", name, "8", "8")
	t.Cleanup(func() { cli(t, "ceph", "osd", "pool", "rm", name, name, "--yes-i-really-really-mean-it") })
	cli(t, "rbd", "pool", "init", name)
	return name
}
