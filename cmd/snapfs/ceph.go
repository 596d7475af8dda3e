//go:build ceph && cgo

package main

import (
	"snapfs/fs"
	"snapfs/rbdio"
)

// cephBuilt says that this binary has the Ceph RBD backend.
const cephBuilt = true

// openCeph connects to the cluster of c and returns one backend per pool
// (named "rbd:POOL"), in the order given, and the function that closes
// the connection once the backends are no longer used.
func openCeph(c *cephFlags, readOnly bool) ([]fs.Pool, func() error, error) {
	cl, err := rbdio.Open(rbdio.Config{CephConf: c.conf, ID: c.id, Keyring: c.keyring, Pools: c.pools, Timeout: c.timeout, ReadOnly: readOnly})
	if err != nil {
		return nil, nil, err
	}
	var out []fs.Pool
	for _, p := range cl.Pools() {
		out = append(out, fs.Pool{Name: p.PoolName(), Backend: p})
	}
	return out, cl.Close, nil
}
