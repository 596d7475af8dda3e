//go:build ceph && cgo

package rbdio

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"snapfs/snapshot"
)

// DefaultTimeout bounds every request to the cluster when Config.Timeout
// is 0: long enough for a busy cluster, short enough that a dead one shows
// as an error rather than a hung mount.
const DefaultTimeout = 30 * time.Second

// Config says how to reach the cluster.
type Config struct {
	// CephConf is the ceph.conf to read; "" lets librados search
	// ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
	CephConf string
	// ID is the client id, without "client." ("" is "admin").
	ID string
	// Keyring overrides the keyring of ceph.conf ("" keeps it).
	Keyring string
	// Pools are the pools to open, in order; at least one.
	Pools []string
	// Timeout bounds each request to the monitors and the OSDs, and the
	// connection itself (DefaultTimeout if 0).
	Timeout time.Duration
	// ReadOnly is for a client that changes nothing (a --read-only
	// mount): Open does not sweep what dead clients left in the pools.
	ReadOnly bool
}

// Cluster is a connection to a Ceph cluster and the pools opened on it.
// It is safe for concurrent use.
type Cluster struct {
	conn    *rados.Conn
	timeout time.Duration
	pools   []*Pool // the configured pools, in order

	mu     sync.Mutex                  // protects ioctxs
	ioctxs map[string]*rados.IOContext // by "pool/namespace", for clone parents
	// handles are the parents' handles, shared (handles.go).
	handles handleCache

	// closed is set by Close: librados crashes on a destroyed handle, so
	// every call checks it first and fails instead.
	closed atomic.Bool
	// openImages counts the images opened and not yet closed: Close
	// refuses while there are any.
	openImages atomic.Int64

	// resweep runs sweepAgain when Open left images of imports and
	// deletes that a client still watched; nil otherwise.
	resweep *time.Timer
	// sweeping is held by sweepAgain, and by Close, so that Close never
	// destroys the I/O contexts under a sweep.
	sweeping sync.Mutex
}

// Open connects to the cluster and opens every pool of cfg, each as a
// [snapshot.Backend]. An unreachable cluster gives an error wrapping
// ErrTimeout within about cfg.Timeout; a missing ceph.conf, keyring or
// pool one wrapping ErrConfig.
func Open(cfg Config) (*Cluster, error) {
	if len(cfg.Pools) == 0 {
		return nil, fmt.Errorf("%w: no pool given", ErrConfig)
	}
	seen := map[string]bool{}
	for _, p := range cfg.Pools {
		if p == "" || seen[p] {
			return nil, fmt.Errorf("%w: pool list %q: empty or repeated name", ErrConfig, cfg.Pools)
		}
		seen[p] = true
	}
	if cfg.ID == "" {
		cfg.ID = "admin"
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("%w: negative timeout %v", ErrConfig, cfg.Timeout)
	}
	conn, err := rados.NewConnWithUser(cfg.ID)
	if err != nil {
		return nil, fmt.Errorf("%w: client %q: %v", ErrConfig, cfg.ID, err)
	}
	if err := configure(conn, cfg); err != nil {
		conn.Shutdown()
		return nil, err
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		err = wrap("connect", err)
		if !errors.Is(err, ErrTimeout) {
			err = fmt.Errorf("%w: connecting as client.%s: %w", ErrConfig, cfg.ID, err)
		}
		return nil, err
	}
	c := &Cluster{conn: conn, timeout: cfg.Timeout, ioctxs: map[string]*rados.IOContext{}}
	for _, name := range cfg.Pools {
		ioctx, err := c.ioctx(name, "")
		if err != nil {
			c.Close()
			return nil, err
		}
		p := &Pool{cluster: c, name: name, ioctx: ioctx}
		c.pools = append(c.pools, p)
		// A pool the key may not read fails here, with the fix, rather
		// than at the first ls of the mount.
		if _, err := rbd.GetImageNames(ioctx); err != nil {
			c.Close()
			if denied(err) {
				return nil, fmt.Errorf("%w: client.%s may not list the images of pool %q (see its caps: ceph auth get client.%s): %w", ErrConfig, cfg.ID, name, cfg.ID, wrap("ls "+name, err))
			}
			return nil, wrap("ls "+name, err)
		}
	}
	if cfg.ReadOnly {
		return c, nil
	}
	watched := false
	for _, p := range c.pools {
		watched = p.sweep() || watched
	}
	if watched {
		// Leftovers a client still watches: a live one's (another mount
		// importing), or those of one that died (kill -9, a crash) and was
		// restarted at once, whose watch the OSDs keep for a while. Look
		// again once that has expired.
		c.resweep = time.AfterFunc(c.watchExpiry()*3/2, c.sweepAgain)
	}
	return c, nil
}

// watchExpiry is how long the OSDs keep the watch of a client that died:
// osd_client_watch_timeout (30 s by default) as ceph.conf and the
// monitors give it to this client.
func (c *Cluster) watchExpiry() time.Duration {
	s, err := c.conn.GetConfigOption("osd_client_watch_timeout")
	if err != nil {
		return 30 * time.Second
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 30 * time.Second
	}
	return time.Duration(n) * time.Second
}

// sweepAgain sweeps every pool again, once (see Open), unless the cluster
// is closed meanwhile.
func (c *Cluster) sweepAgain() {
	c.sweeping.Lock()
	defer c.sweeping.Unlock()
	if c.closed.Load() {
		return
	}
	for _, p := range c.pools {
		p.sweep()
	}
}

// configure reads the configuration and sets the timeouts, which win over
// ceph.conf: a hung mount is worse than an error.
func configure(conn *rados.Conn, cfg Config) error {
	var err error
	if cfg.CephConf != "" {
		err = conn.ReadConfigFile(cfg.CephConf)
	} else {
		err = conn.ReadDefaultConfigFile()
	}
	if err != nil {
		where := cfg.CephConf
		if where == "" {
			where = "$CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config or ./ceph.conf"
		}
		return fmt.Errorf("%w: reading %s: %v", ErrConfig, where, err)
	}
	// CEPH_ARGS, as every Ceph tool honours it.
	if err := conn.ParseDefaultConfigEnv(); err != nil {
		return fmt.Errorf("%w: CEPH_ARGS: %v", ErrConfig, err)
	}
	secs := strconv.Itoa(int(math.Ceil(cfg.Timeout.Seconds())))
	opts := [][2]string{
		{"rados_osd_op_timeout", secs},
		{"rados_mon_op_timeout", secs},
		{"client_mount_timeout", secs},
		// librbd's own complaints go to the client log, not to the
		// terminal of the mount: the errors we return say what failed.
		{"err_to_stderr", "false"},
		{"log_to_stderr", "false"},
	}
	if cfg.Keyring != "" {
		opts = append(opts, [2]string{"keyring", cfg.Keyring})
	}
	for _, o := range opts {
		if err := conn.SetConfigOption(o[0], o[1]); err != nil {
			return fmt.Errorf("%w: setting %s=%s: %v", ErrConfig, o[0], o[1], err)
		}
	}
	return nil
}

// Pools returns the pools of the configuration, in order.
func (c *Cluster) Pools() []*Pool { return c.pools }

// Pool returns the configured pool name, or nil.
func (c *Cluster) Pool(name string) *Pool {
	for _, p := range c.pools {
		if p.name == name {
			return p
		}
	}
	return nil
}

// Timeout is the bound on each request to the cluster.
func (c *Cluster) Timeout() time.Duration { return c.timeout }

// ioctx returns an I/O context on pool (and RADOS namespace ns), opened
// once and kept: clone chains reach into pools that were not configured.
func (c *Cluster) ioctx(pool, ns string) (*rados.IOContext, error) {
	key := pool + "/" + ns
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil, errClosedCluster
	}
	if io := c.ioctxs[key]; io != nil {
		return io, nil
	}
	io, err := c.conn.OpenIOContext(pool)
	if err != nil {
		err = wrap("open pool "+pool, err)
		if !errors.Is(err, ErrTimeout) {
			err = fmt.Errorf("%w: pool %q: %w", ErrConfig, pool, err)
		}
		return nil, err
	}
	if ns != "" {
		io.SetNamespace(ns)
	}
	c.ioctxs[key] = io
	return io, nil
}

// errClosedCluster is returned by calls after Close.
var errClosedCluster = fmt.Errorf("rbdio: %w: the cluster connection is closed", os.ErrClosed)

// Close closes the pools and the connection. It refuses (ErrBusy) while
// images opened from the pools are open. No call of the pools may run
// during Close; calls after it fail.
func (c *Cluster) Close() error {
	c.sweeping.Lock()
	defer c.sweeping.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil
	}
	if n := c.openImages.Load(); n > 0 {
		return fmt.Errorf("%w: images of the cluster still open: %d; close them first", snapshot.ErrBusy, n)
	}
	c.closed.Store(true)
	if c.resweep != nil {
		c.resweep.Stop()
	}
	c.closeHandles()
	for _, io := range c.ioctxs {
		io.Destroy()
	}
	c.ioctxs = nil
	c.conn.Shutdown()
	return nil
}

// instanceID is our client's global id, as watchers list it.
func (c *Cluster) instanceID() int64 { return int64(c.conn.GetInstanceID()) }
