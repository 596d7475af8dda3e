//go:build !(libvirt && cgo)

package main

import (
	"errors"

	"snapfs/snapshot"
)

// libvirtBuilt says that this binary lacks the libvirt instance provider
// (built without -tags libvirt, or with CGO_ENABLED=0).
const libvirtBuilt = false

// errNoLibvirt says how to get libvirt support.
var errNoLibvirt = errors.New("this snapfs was built without libvirt support: rebuild it with CGO_ENABLED=1 go build -tags libvirt ./cmd/snapfs (needs libvirt-dev)")

// openLibvirt refuses: the flags exist in every build, so that --help is
// the same everywhere and the error says how to get libvirt support.
func openLibvirt(f *libvirtFlags, o libvirtOptions) (snapshot.InstanceProvider, func() error, error) {
	return nil, nil, errNoLibvirt
}
