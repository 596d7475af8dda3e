package main

import (
	"os"
	"time"

	"github.com/spf13/pflag"
)

// cephFlags are the flags that name a Ceph cluster and its pools, for
// `snapfs mount` (and any command that works on RBD volumes).
type cephFlags struct {
	conf, id, keyring string
	pools             []string
	timeout           time.Duration
}

// addCephFlags adds --ceph-conf, --ceph-id, --ceph-keyring, --pool and
// --ceph-timeout to f, stored in c.
func addCephFlags(f *pflag.FlagSet, c *cephFlags) {
	f.StringVar(&c.conf, "ceph-conf", "", "ceph.conf of the cluster whose RBD pools to show (default: $CEPH_CONF, /etc/ceph/ceph.conf)")
	f.StringVar(&c.id, "ceph-id", "admin", "Ceph client id (without \"client.\")")
	f.StringVar(&c.keyring, "ceph-keyring", "", "keyring (default: the one ceph.conf names)")
	f.StringSliceVar(&c.pools, "pool", nil, "RBD pool(s) to show, comma-separated or repeated")
	f.DurationVar(&c.timeout, "ceph-timeout", 30*time.Second, "bound on every request to the cluster: past it, EIO/ETIMEDOUT instead of a hang")
}

// enabled reports whether the command line asks for Ceph.
func (c *cephFlags) enabled() bool { return len(c.pools) > 0 }

// poolStagingDir is where a mount without a local store (pools only) writes
// imports before they go to the pool: $TMPDIR, else /var/tmp, which holds
// large files on disk where /tmp is often in RAM.
func poolStagingDir() string {
	if d := os.Getenv("TMPDIR"); d != "" {
		return d
	}
	return "/var/tmp"
}
