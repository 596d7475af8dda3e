//go:build libvirt && cgo

package main

import (
	"snapfs/snapshot"
	"snapfs/virt"
)

// libvirtBuilt says that this binary has the libvirt instance provider.
const libvirtBuilt = true

// openLibvirt connects to the libvirt of f (virt.DefaultURI when none was
// given). The error wraps virt.ErrUnavailable when libvirt cannot be
// reached.
func openLibvirt(f *libvirtFlags, o libvirtOptions) (snapshot.InstanceProvider, func() error, error) {
	var store virt.ExternalHeads
	if o.store != nil {
		// The store makes the new heads of the disks that are its
		// volumes' heads, so that it stays the judge of its files.
		store = o.store
	}
	p, err := virt.Open(virt.Config{
		URI:            f.uri,
		StateDir:       o.stateDir,
		RequireQuiesce: f.requireQuiesce,
		VolumeOf:       o.volumeOf(),
		Store:          store,
		Pools:          o.poolOf(),
		Logf:           o.logf,
	})
	if err != nil {
		return nil, nil, err
	}
	return p, p.Close, nil
}
