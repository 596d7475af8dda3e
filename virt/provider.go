//go:build libvirt && cgo

package virt

// Lock order: Provider.locksMu, then a domain lock (lockDomain: the
// in-process channel, then the lock file), then Provider.freezesMu and
// frozen.mu, held for nanoseconds. libvirt calls are made with no
// Provider mutex held, except under a domain lock.

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/snapshot"
)

// DefaultURI is the libvirt URI used when none is given: the system qemu
// driver.
const DefaultURI = "qemu:///system"

// Defaults of Config.
const (
	DefaultFreezeTimeout = 10 * time.Second
	DefaultAgentTimeout  = 5 * time.Second
	DefaultThawTimeout   = 30 * time.Second
)

// Config configures a Provider.
type Config struct {
	// URI of libvirt (DefaultURI when empty).
	URI string
	// StateDir holds the snapshot records (required).
	StateDir string
	// RequireQuiesce refuses to snapshot a running domain whose guest
	// filesystems cannot be frozen, as Nova's os_require_quiesce, instead
	// of falling back to a crash-consistent snapshot.
	RequireQuiesce bool
	// FreezeTimeout bounds the frozen window: this long after the freeze
	// began, the guest is thawed whatever the snapshot is doing (and the
	// snapshot is then recorded crash-consistent).
	FreezeTimeout time.Duration
	// AgentTimeout is set as the domain's guest agent response timeout
	// (virsh guest-agent-timeout) before a freeze: libvirt's default is to
	// wait for ever, and a hung agent would hold the freeze call, and the
	// thaw queued behind it, with it. Negative: leave the domain's setting
	// alone.
	AgentTimeout time.Duration
	// ThawTimeout is how long a failed thaw is retried (the agent may be
	// restarting) before the call gives up with ErrThaw; a background retry
	// then carries on until the provider is closed.
	ThawTimeout time.Duration
	// VolumeOf maps a disk file to the snapfs volume it belongs to (a
	// file of the local store), if any; nil maps none.
	VolumeOf func(path string) (volume string, ok bool)
	// Store is the local store whose volume heads domains may run off:
	// a snapshot of such a disk has the store make the new head and
	// record the snapshot as the volume's (see ExternalHeads). Nil: such
	// disks are snapshotted like any other file.
	Store ExternalHeads
	// Pools returns the backend of an RBD pool, through which the RBD disks
	// of domains are snapshotted; nil, or false, makes RBD disks
	// unsupported.
	Pools func(pool string) (snapshot.Backend, bool)
	// QemuImg is the qemu-img binary, used on shut-off domains ("qemu-img"
	// from PATH when empty).
	QemuImg string
	// Logf logs what a caller cannot be told (a background thaw); log.Printf
	// when nil.
	Logf func(format string, args ...any)
}

// ExternalHeads is what the provider needs of the local store
// (*snapshot.LocalStore) for disks that are its volumes' heads.
type ExternalHeads interface {
	// PrepareExternalHead makes the new head qemu switches to.
	PrepareExternalHead(ctx context.Context, headPath, name string, opts snapshot.SnapshotOptions) (*snapshot.ExternalHead, error)
	// DeleteSnapshot deletes a volume's snapshot (rmdir of a shut-off
	// domain's snapshot).
	DeleteSnapshot(ctx context.Context, volume, name string) error
	// Revert makes a volume's head read as its snapshot again, in a new
	// head file (revert of a shut-off domain), which Volume then names.
	Revert(ctx context.Context, volume, name string) error
	Volume(ctx context.Context, name string) (snapshot.Volume, error)
}

// Provider is the libvirt [snapshot.InstanceProvider]: the domains of one
// libvirt connection are the instances. It is safe for concurrent use.
type Provider struct {
	cfg     Config
	connMu  sync.Mutex       // protects conn, dialing
	conn    *libvirt.Connect // use connection(), which replaces a dead one
	dialing chan dialResult  // a connection attempt still under way (dial.go)
	records recordStore

	locksMu sync.Mutex // protects locks
	locks   map[string]*domainLock

	freezesMu sync.Mutex         // protects freezes
	freezes   map[string]*frozen // by domain UUID: the freeze under way

	closed chan struct{} // closed by Close: background thaws stop
	bg     sync.WaitGroup
}

// domainLock is the in-process half of a domain lock. A channel rather
// than a sync.Mutex so that a waiter can give up when its context is done.
type domainLock struct {
	ch   chan struct{}
	refs int
}

// Open connects to libvirt. The error wraps ErrUnavailable when libvirt
// cannot be reached.
func Open(cfg Config) (*Provider, error) {
	if cfg.URI == "" {
		cfg.URI = DefaultURI
	}
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("%w: virt: no state directory for the snapshot records", snapshot.ErrInvalid)
	}
	if cfg.FreezeTimeout <= 0 {
		cfg.FreezeTimeout = DefaultFreezeTimeout
	}
	if cfg.AgentTimeout == 0 {
		cfg.AgentTimeout = DefaultAgentTimeout
	}
	if cfg.ThawTimeout <= 0 {
		cfg.ThawTimeout = DefaultThawTimeout
	}
	if cfg.QemuImg == "" {
		cfg.QemuImg = "qemu-img"
	}
	if cfg.Logf == nil {
		cfg.Logf = log.Printf
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("virt: state directory: %w", err)
	}
	conn, _, err := dial(cfg.URI, nil)
	if err != nil {
		return nil, err
	}
	return &Provider{
		cfg: cfg, conn: conn, records: recordStore{dir: cfg.StateDir},
		locks: map[string]*domainLock{}, freezes: map[string]*frozen{},
		closed: make(chan struct{}),
	}, nil
}

// Close stops background thaws and closes the connection.
func (p *Provider) Close() error {
	select {
	case <-p.closed:
		return nil
	default:
	}
	close(p.closed)
	p.bg.Wait()
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if pending := p.dialing; pending != nil {
		// A dial to a daemon that did not answer: close what it
		// brings, if it ever ends.
		go func() {
			if r := <-pending; r.conn != nil {
				r.conn.Close()
			}
		}()
	}
	_, err := p.conn.Close()
	return err
}

// connection returns the libvirt connection, connected again if libvirtd
// closed it: a restarted daemon (an upgrade, a crash) closes the sockets
// of its clients, and every later call on the old connection fails ("client
// socket is closed") until the mount is restarted. IsAlive asks the client
// side only: no round trip to the daemon. The error wraps ErrUnavailable
// while libvirt cannot be reached.
func (p *Provider) connection() (*libvirt.Connect, error) {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if alive, err := p.conn.IsAlive(); err == nil && alive {
		return p.conn, nil
	}
	conn, pending, err := dial(p.cfg.URI, p.dialing)
	p.dialing = pending
	if err != nil {
		return nil, err
	}
	// Domains looked up on the old connection hold their own references
	// to it: closing ours frees it once they are freed.
	p.conn.Close()
	p.conn = conn
	p.cfg.Logf("virt: %s: connected again", p.cfg.URI)
	return conn, nil
}

// onConnection runs a call that only reads (it may run twice) on the
// connection, and again on a new one when the call found the connection
// dead: the first call after libvirtd went away is the one that finds out.
func onConnection[T any](p *Provider, call func(*libvirt.Connect) (T, error)) (T, error) {
	conn, err := p.connection()
	if err != nil {
		var zero T
		return zero, err
	}
	v, err := call(conn)
	if alive, aerr := conn.IsAlive(); err == nil || aerr != nil || alive {
		return v, err
	}
	if conn, err = p.connection(); err != nil {
		var zero T
		return zero, err
	}
	return call(conn)
}

// URI returns the libvirt URI of the provider.
func (p *Provider) URI() string { return p.cfg.URI }

// lookup returns the domain called name and its UUID. The caller frees it.
func (p *Provider) lookup(name string) (*libvirt.Domain, string, error) {
	if err := snapshot.CheckInstanceName(name); err != nil {
		return nil, "", err
	}
	dom, err := onConnection(p, func(c *libvirt.Connect) (*libvirt.Domain, error) { return c.LookupDomainByName(name) })
	if err != nil {
		return nil, "", wrap(err, fmt.Sprintf("instance %q", name))
	}
	uuid, err := dom.GetUUIDString()
	if err != nil {
		dom.Free()
		return nil, "", wrap(err, fmt.Sprintf("instance %q", name))
	}
	return dom, uuid, nil
}

// lockDomain serialises the mutations of one domain, within the process
// and with other processes (an flock on STATE/UUID.lock).
func (p *Provider) lockDomain(ctx context.Context, uuid string) (release func(), err error) {
	p.locksMu.Lock()
	l := p.locks[uuid]
	if l == nil {
		l = &domainLock{ch: make(chan struct{}, 1)}
		p.locks[uuid] = l
	}
	l.refs++
	p.locksMu.Unlock()
	unref := func() {
		p.locksMu.Lock()
		if l.refs--; l.refs == 0 {
			delete(p.locks, uuid)
		}
		p.locksMu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
	case <-ctx.Done():
		unref()
		return nil, ctx.Err()
	}
	f, err := os.OpenFile(filepath.Join(p.cfg.StateDir, uuid+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err == nil {
		err = flockContext(ctx, f)
		if err != nil {
			f.Close()
		}
	}
	if err != nil {
		<-l.ch
		unref()
		return nil, err
	}
	return func() {
		f.Close() // drops the flock
		<-l.ch
		unref()
	}, nil
}

// flockContext takes an exclusive flock on f, polling so that a done
// context ends the wait.
func flockContext(ctx context.Context, f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// domainInfo is what the provider reads of a domain at once.
type domainInfo struct {
	name, uuid string
	state      libvirt.DomainState
	xml        string
	disks      []Disk
}

// describe reads a domain's state, live XML and disks.
func (p *Provider) describe(dom *libvirt.Domain) (*domainInfo, error) {
	name, err := dom.GetName()
	if err != nil {
		return nil, wrap(err, "domain name")
	}
	uuid, err := dom.GetUUIDString()
	if err != nil {
		return nil, wrap(err, fmt.Sprintf("instance %q", name))
	}
	state, _, err := dom.GetState()
	if err != nil {
		return nil, wrap(err, fmt.Sprintf("instance %q", name))
	}
	doc, err := dom.GetXMLDesc(0)
	if err != nil {
		return nil, wrap(err, fmt.Sprintf("instance %q", name))
	}
	_, disks, err := parseDomainXML(doc)
	if err != nil {
		return nil, err
	}
	for i := range disks {
		d := &disks[i]
		if d.Kind == FileDisk && p.cfg.VolumeOf != nil {
			if v, ok := p.cfg.VolumeOf(d.Path); ok {
				d.Volume = v
			}
		}
		if d.Kind == RBDDisk && d.Snapshot {
			if _, ok := p.pool(d.Pool); ok {
				d.Volume = d.Image
			} else {
				d.Snapshot, d.Why = false, fmt.Sprintf("RBD pool %q is not mounted", d.Pool)
			}
		}
	}
	return &domainInfo{name: name, uuid: uuid, state: state, xml: doc, disks: disks}, nil
}

// pool returns the backend of an RBD pool.
func (p *Provider) pool(name string) (snapshot.Backend, bool) {
	if p.cfg.Pools == nil {
		return nil, false
	}
	return p.cfg.Pools(name)
}

// instance turns a domain into a snapshot.Instance.
func (info *domainInfo) instance() snapshot.Instance {
	running := info.state == libvirt.DOMAIN_RUNNING || info.state == libvirt.DOMAIN_BLOCKED
	in := snapshot.Instance{Name: info.name, Running: running, Disks: []snapshot.Disk{}}
	for _, d := range info.disks {
		// A store volume by its name; anything else by its source (an
		// absolute path, rbd:POOL/IMAGE), which the mount links to
		// (fs/instance_disk.go).
		vol := d.Volume
		if vol == "" || d.Kind == RBDDisk {
			vol = d.Source
		}
		in.Disks = append(in.Disks, snapshot.Disk{Device: d.Device, Volume: vol})
	}
	return in
}

// ListInstances implements [snapshot.InstanceProvider]: every domain,
// running or not, sorted by name. Domains whose names snapfs cannot show
// as directories are left out.
func (p *Provider) ListInstances(ctx context.Context) ([]snapshot.Instance, error) {
	doms, err := onConnection(p, func(c *libvirt.Connect) ([]libvirt.Domain, error) { return c.ListAllDomains(0) })
	if err != nil {
		return nil, wrap(err, "list domains")
	}
	defer func() {
		for i := range doms {
			doms[i].Free()
		}
	}()
	out := []snapshot.Instance{}
	for i := range doms {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		info, err := p.describe(&doms[i])
		if errors.Is(err, snapshot.ErrNotFound) {
			continue // undefined while we listed
		}
		if err != nil {
			return nil, err
		}
		if snapshot.CheckInstanceName(info.name) != nil {
			continue
		}
		out = append(out, info.instance())
	}
	slices.SortFunc(out, func(a, b snapshot.Instance) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Instance implements [snapshot.InstanceProvider].
func (p *Provider) Instance(ctx context.Context, name string) (snapshot.Instance, error) {
	dom, _, err := p.lookup(name)
	if err != nil {
		return snapshot.Instance{}, err
	}
	defer dom.Free()
	info, err := p.describe(dom)
	if err != nil {
		return snapshot.Instance{}, err
	}
	return info.instance(), nil
}

// Disks returns the disks of a domain, with what backs each and whether a
// snapshot takes it.
func (p *Provider) Disks(ctx context.Context, name string) ([]Disk, error) {
	dom, _, err := p.lookup(name)
	if err != nil {
		return nil, err
	}
	defer dom.Free()
	info, err := p.describe(dom)
	if err != nil {
		return nil, err
	}
	return info.disks, nil
}

// stateName names a domain state for records and messages.
func stateName(s libvirt.DomainState) string {
	switch s {
	case libvirt.DOMAIN_RUNNING:
		return "running"
	case libvirt.DOMAIN_PAUSED:
		return "paused"
	case libvirt.DOMAIN_SHUTOFF:
		return "shutoff"
	case libvirt.DOMAIN_SHUTDOWN:
		return "shutting down"
	case libvirt.DOMAIN_CRASHED:
		return "crashed"
	case libvirt.DOMAIN_PMSUSPENDED:
		return "suspended"
	case libvirt.DOMAIN_BLOCKED:
		return "blocked"
	}
	return fmt.Sprintf("state %d", s)
}
