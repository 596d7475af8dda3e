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
	p, err := virt.Open(virt.Config{
		URI:            f.uri,
		StateDir:       o.stateDir,
		RequireQuiesce: f.requireQuiesce,
		VolumeOf:       o.volumeOf(),
		Pools:          o.poolOf(),
		Logf:           o.logf,
	})
	if err != nil {
		return nil, nil, err
	}
	return p, p.Close, nil
}
