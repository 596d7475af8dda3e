package virt

// The records of a domain's snapshots: STATE/UUID.json, one file per domain,
// replaced whole (temp file, fsync, rename, fsync of the directory), so a
// crash leaves the old version or the new one. STATE/UUID.lock serialises
// the processes that change one domain (flock).

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"snapfs/snapshot"
)

// Record is what the provider keeps of one snapshot of a domain.
type Record struct {
	Name        string               `json:"name"`
	Created     time.Time            `json:"created"`
	Consistency snapshot.Consistency `json:"consistency"`
	// Frozen is how long the guest filesystems may have been frozen: from
	// the start of the freeze call to the end of the thaw (0 if not
	// frozen).
	Frozen time.Duration `json:"frozen_ns,omitempty"`
	// Why says why the consistency is not quiesced, for a running domain.
	Why string `json:"why,omitempty"`
	// Window breaks the frozen window down (nil when not frozen).
	Window *Window `json:"window,omitempty"`
	// State is the domain's state when the snapshot was taken (running,
	// paused, shutoff).
	State string `json:"state"`
	// DomainXML is the domain's XML just before the snapshot (the live XML
	// of a running domain): its disks name the snapshot's layers.
	DomainXML string `json:"domain_xml"`
	// Memory is the file holding the memory state, for a memory snapshot.
	Memory   string            `json:"memory,omitempty"`
	Disks    []DiskRecord      `json:"disks"`
	Metadata map[string]string `json:"metadata,omitempty"`
	// Deleting is set while the snapshot is being deleted: it is hidden,
	// and a new delete finishes the job.
	Deleting bool `json:"deleting,omitempty"`
}

// Window is where the time of a frozen window went.
type Window struct {
	// Freeze is the freeze call (the guest flushes and freezes).
	Freeze time.Duration `json:"freeze_ns"`
	// Snapshot is the disk snapshots (one libvirt transaction, RBD
	// snapshots).
	Snapshot time.Duration `json:"snapshot_ns"`
	// Verify is the agent's confirmation that the freeze held.
	Verify time.Duration `json:"verify_ns"`
	// Thaw is the thaw call, with its retries.
	Thaw time.Duration `json:"thaw_ns"`
}

// DiskRecord is one disk of a snapshot.
type DiskRecord struct {
	Device string   `json:"device"`
	Kind   DiskKind `json:"kind"`
	// Format is the format of Layer (qcow2, raw).
	Format string `json:"format,omitempty"`
	// Layer holds the snapshot: for a file disk, the image file whose
	// backing chain reads as the disk did at the snapshot (the file qemu
	// wrote to until then); for an RBD disk, rbd:POOL/IMAGE@SNAP.
	Layer string `json:"layer"`
	// Overlay is the file qemu wrote to after the snapshot (file disks).
	Overlay string `json:"overlay,omitempty"`
	// Pool and Image name an RBD disk's image; Volume the snapfs volume
	// behind the disk, if any.
	Pool   string `json:"pool,omitempty"`
	Image  string `json:"image,omitempty"`
	Volume string `json:"volume,omitempty"`
	// Store says that Layer is Volume's snapshot of the same name in the
	// local store, and Overlay the head the store made: the store owns
	// both files, and deletes the snapshot.
	Store bool `json:"store,omitempty"`
	// Merged is set by a delete once this disk's layer has been merged
	// with its child (Child), which a later delete must not merge again.
	Merged bool   `json:"merged,omitempty"`
	Child  string `json:"child,omitempty"`
}

// disk returns the record of device, or nil.
func (r *Record) disk(device string) *DiskRecord {
	for i := range r.Disks {
		if r.Disks[i].Device == device {
			return &r.Disks[i]
		}
	}
	return nil
}

// domainRecords is the content of STATE/UUID.json.
type domainRecords struct {
	UUID string `json:"uuid"`
	// Name is the domain's name when the file was last written (domains
	// can be renamed; the UUID stays).
	Name      string   `json:"name"`
	Snapshots []Record `json:"snapshots"`
	// Created lists the overlay files the provider made (snapshots,
	// reverts): only those does it ever remove.
	Created []string `json:"created,omitempty"`
}

// find returns the index of snapshot name, or -1.
func (d *domainRecords) find(name string) int {
	return slices.IndexFunc(d.Snapshots, func(r Record) bool { return r.Name == name })
}

// ours says whether the provider made file path.
func (d *domainRecords) ours(path string) bool { return slices.Contains(d.Created, path) }

// forget drops path from Created.
func (d *domainRecords) forget(path string) {
	d.Created = slices.DeleteFunc(d.Created, func(p string) bool { return p == path })
}

// recordStore reads and writes the records under one directory.
type recordStore struct{ dir string }

func (s recordStore) path(uuid string) string { return filepath.Join(s.dir, uuid+".json") }

// load returns the records of a domain (none yet: an empty set).
func (s recordStore) load(uuid string) (*domainRecords, error) {
	b, err := os.ReadFile(s.path(uuid))
	if errors.Is(err, fs.ErrNotExist) {
		return &domainRecords{UUID: uuid}, nil
	}
	if err != nil {
		return nil, err
	}
	var d domainRecords
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", snapshot.ErrInvalid, s.path(uuid), err)
	}
	if d.UUID != uuid {
		return nil, fmt.Errorf("%w: %s holds the records of domain %q", snapshot.ErrInvalid, s.path(uuid), d.UUID)
	}
	return &d, nil
}

// save replaces the records of a domain crash-safely.
func (s recordStore) save(d *domainRecords) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return err
	}
	final := s.path(d.UUID)
	tmp, err := os.CreateTemp(s.dir, "."+d.UUID+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails once renamed
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return err
	}
	dir, err := os.Open(s.dir)
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}

// sortedKeys returns the keys of m, sorted.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
