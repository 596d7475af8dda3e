package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"

	"snapfs/fs"
	"snapfs/snapshot"
)

// libvirtNone is the --libvirt value that turns the default connection off.
const libvirtNone = "none"

// libvirtFlags are the flags of the libvirt instance provider, for `snapfs
// mount` and `snapfs instance revert`.
type libvirtFlags struct {
	uri            string
	requireQuiesce bool
	// explicit is set when --libvirt was given: a failure to connect is
	// then an error, not a quiet mount without libvirt.
	explicit bool
}

// addLibvirtFlags adds --libvirt and --require-quiesce to f, stored in c.
func addLibvirtFlags(f *pflag.FlagSet, c *libvirtFlags) {
	addLibvirtURIFlag(f, c)
	f.BoolVar(&c.requireQuiesce, "require-quiesce", false, "refuse a snapshot of a running domain whose guest agent cannot freeze its filesystems (instead of falling back to crash-consistent)")
}

// addLibvirtURIFlag adds --libvirt to f, stored in c.
func addLibvirtURIFlag(f *pflag.FlagSet, c *libvirtFlags) {
	f.StringVar(&c.uri, "libvirt", "", "libvirt URI whose domains are instances (default qemu:///system when reachable; \"none\": no libvirt)")
}

// libvirtOptions is what a libvirt provider is opened with, besides the
// flags.
type libvirtOptions struct {
	// stateDir holds the provider's snapshot records.
	stateDir string
	// store, when there is a local store, names the domains' disks that
	// are its volumes.
	store *snapshot.LocalStore
	// pools are the mounted RBD pools, through which RBD disks are
	// snapshotted.
	pools []fs.Pool
	logf  func(format string, args ...any)
}

// libvirtStateDir returns where the libvirt provider keeps its records:
// STORE/libvirt with a local store, else under $TMPDIR or /var/tmp (on
// disk, and kept across mounts).
func libvirtStateDir(store *snapshot.LocalStore) string {
	if store != nil {
		return filepath.Join(store.Dir(), "libvirt")
	}
	return filepath.Join(poolStagingDir(), fmt.Sprintf("snapfs-libvirt-%d", os.Getuid()))
}

// volumeOf returns the function that maps a domain's disk file to the
// local store's volume whose head it is, or nil without a store.
func (o libvirtOptions) volumeOf() func(path string) (string, bool) {
	if o.store == nil {
		return nil
	}
	return func(path string) (string, bool) {
		vols, err := o.store.ListVolumes(context.Background())
		if err != nil {
			return "", false
		}
		for _, v := range vols {
			if v.HeadPath != "" && filepath.Clean(v.HeadPath) == filepath.Clean(path) {
				return v.Name, true
			}
		}
		return "", false
	}
}

// poolOf returns the function that finds a mounted RBD pool by name.
func (o libvirtOptions) poolOf() func(pool string) (snapshot.Backend, bool) {
	return func(pool string) (snapshot.Backend, bool) {
		for _, p := range o.pools {
			if p.Name == pool {
				return p.Backend, true
			}
		}
		return nil, false
	}
}

// withLibvirt adds the libvirt domains to the instances of a mount: the
// local store's instances (if any) first, then the domains, a domain named
// as a store instance hidden (and logged; see snapshot.MergeInstances).
// Without --libvirt, an unreachable qemu:///system leaves instances as they
// are, and note says so (the caller prints it once the mount is up, so that
// a mount that fails prints only its error). The returned function closes
// the connection.
func withLibvirt(f *libvirtFlags, instances snapshot.InstanceProvider, o libvirtOptions) (_ snapshot.InstanceProvider, closeFn func() error, note string, err error) {
	nothing := func() error { return nil }
	if f.uri == libvirtNone {
		return instances, nothing, "", nil
	}
	p, closeFn, err := openLibvirt(f, o)
	if err != nil {
		if f.explicit {
			if f.uri == "" {
				return nil, nil, "", fmt.Errorf("libvirt: %w", err)
			}
			return nil, nil, "", fmt.Errorf("--libvirt %s: %w", f.uri, err)
		}
		return instances, nothing, fmt.Sprintf("snapfs: no libvirt domains under instances/ (%v); --libvirt URI names another libvirt", err), nil
	}
	if instances == nil {
		return p, closeFn, "", nil
	}
	return snapshot.MergeInstances(o.logf, instances, p), closeFn, "", nil
}
