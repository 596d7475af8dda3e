// Package snapshot is the model of snapfs: volumes, their snapshot chains,
// clones and instances, over a backend that stores them (the local store of
// qcow2 chains, Ceph RBD) and an instance provider (the local store's own
// instance groups, libvirt).
//
// The FUSE layer (package fs) only adapts this model to files; everything
// here can be tested without a kernel.
//
// # Backends
//
// [LocalStore] (OpenLocal) is the embedded backend: each volume a chain of
// qcow2 files in one directory, with its metadata in one JSON file, safe
// against kill -9 at any point and shared safely by several processes (a
// mount and CLI commands). Its layout and lock order are described at the
// top of local.go. [Manager] adds what works the same over any backend:
// consistent instance snapshots (freeze, snapshot, always thaw) and holds
// that keep open snapshots from being deleted.
//
// Optional interfaces, which Manager checks for its callers: [Cloner]
// (copy-on-write clones and flatten), [Reverter] (a head back to a
// snapshot) and [Restorer] (several volumes and an instance created at
// once, for restores). The local store implements them all.
//
// # Exports and restores
//
// FullExport and IncrementalExport build the qcow2 files the mount serves
// (disk.qcow2, since/S1.qcow2) over any backend; exchange.go defines the
// meta.json files beside them (VolumeSnapshotMeta, InstanceSnapshotMeta),
// and restore.go turns a copied-out snapshot folder back into volumes and
// an instance (RestoreDir, RestoreVolume, RestoreInstance), treating every
// file as hostile.
//
// # Errors
//
// Backends return errors wrapping the sentinels below (ErrNotFound,
// ErrExists, ErrBusy, ErrInvalidName, ErrReadOnly, ...) so that package fs
// maps them to errnos in one place. Refused imports are [*ImportError],
// which wraps ErrInvalid and the qcow sentinel that refused the image.
//
// # Concurrency
//
// Backends serialise the mutations of one volume and let reads run in
// parallel with everything. An image opened from a backend keeps reading
// the same bytes while snapshots around it are taken and deleted.
//
// # Crash tests
//
// The environment variable named by [PauseEnv] stops a mutation of the
// local store at a named point, so that a test can kill -9 the process
// exactly there (see pause.go).
package snapshot

import (
	"context"
	"errors"
	"time"

	"snapfs/qcow"
)

// Sentinel errors of the model. Backends wrap them with details.
var (
	ErrNotFound    = errors.New("snapshot: not found")
	ErrExists      = errors.New("snapshot: already exists")
	ErrBusy        = errors.New("snapshot: in use")
	ErrInvalidName = errors.New("snapshot: invalid name")
	ErrReadOnly    = errors.New("snapshot: read-only")
	ErrUnsupported = errors.New("snapshot: not supported by this backend")
	ErrInvalid     = errors.New("snapshot: invalid argument")
)

// Consistency says how consistent a snapshot is.
type Consistency string

// The consistency levels, weakest last.
const (
	// Quiesced: the guest agent froze the filesystems.
	Quiesced Consistency = "quiesced"
	// CrashConsistent: every disk was taken at one instant (paused, or an
	// atomic group snapshot), as after a power cut.
	CrashConsistent Consistency = "crash-consistent"
	// None: no guarantee across disks or against in-flight writes.
	None Consistency = "none"
)

// SnapshotRef names one snapshot of one volume.
type SnapshotRef struct {
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
}

// Volume describes a volume.
type Volume struct {
	Name    string    `json:"name"`
	Size    int64     `json:"size"`
	Created time.Time `json:"created"`
	// Parent is the snapshot this volume was cloned from, if any.
	Parent *SnapshotRef `json:"parent,omitempty"`
	// HeadPath is where a VM can run off the volume's writable head
	// (local store: the head qcow2 file).
	HeadPath string `json:"head_path,omitempty"`
	// BytesUsed is the space the volume's own layers take.
	BytesUsed int64             `json:"bytes_used"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	// Chain lists the layers the head reads through, head first, as
	// `qemu-img info --backing-chain` does (local store: file paths;
	// a clone's chain goes on into its parent volume's layers).
	Chain []string `json:"chain,omitempty"`
	// Flatten is set while the volume, a clone, is being flattened
	// (Cloner.Flatten), by this process or another one.
	Flatten *Progress `json:"flatten,omitempty"`
}

// Progress is how far a long operation has got, in bytes.
type Progress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
	// Started is when the operation began.
	Started time.Time `json:"started"`
}

// Snapshot describes one immutable snapshot.
type Snapshot struct {
	Volume  string    `json:"volume"`
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	Size    int64     `json:"size"`
	// Parent is the previous snapshot of the same volume ("" for the first).
	Parent      string      `json:"parent,omitempty"`
	Consistency Consistency `json:"consistency"`
	// Method says how the snapshot was taken together with the other
	// volumes of its instance snapshot, where the backend records it
	// (rbdio: "single-image", "idle" or "sequential").
	Method   string            `json:"method,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
	// Instance is set when the snapshot was taken as part of a snapshot
	// of that instance (it is then deleted with the instance snapshot).
	Instance string `json:"instance,omitempty"`
	// Path is where the snapshot's layer lives, for qemu-img (local store:
	// the read-only qcow2 file whose backing chain is the snapshot).
	Path string `json:"path,omitempty"`
	// Clones lists the volumes cloned from this snapshot, sorted: while
	// there are any, the snapshot cannot be deleted.
	Clones []string `json:"clones,omitempty"`
}

// SnapshotChecker is implemented by backends that can tell whether a
// snapshot exists much more cheaply than Snapshot describes it (rbdio: two
// RADOS reads instead of opening a clone's whole parent chain). Manager.Hold
// uses it: every open of an export holds its snapshot.
type SnapshotChecker interface {
	// SnapshotExists returns nil if volume has snapshot name, or an error
	// wrapping ErrNotFound if it does not.
	SnapshotExists(ctx context.Context, volume, name string) error
}

// SnapshotOptions go with a new snapshot.
type SnapshotOptions struct {
	Consistency Consistency
	Metadata    map[string]string
}

// Backend is a set of volumes with snapshot chains. Snapshots are immutable;
// a volume may have a parent snapshot in another volume (a clone); the
// backend can say which extents changed between two snapshots.
//
// Mutations of one volume are serialised by the backend; reads run in
// parallel with each other and with mutations, and an image opened before a
// mutation keeps reading what it read before.
type Backend interface {
	// Name identifies the backend in messages ("local", "rbd:pool").
	Name() string

	ListVolumes(ctx context.Context) ([]Volume, error)
	Volume(ctx context.Context, name string) (Volume, error)
	CreateVolume(ctx context.Context, name string, size int64) (Volume, error)
	// ImportVolume creates volume name from an image, which is untrusted:
	// it has been opened with qcow.Options.Untrusted and no backing files.
	// The volume appears atomically, or not at all.
	ImportVolume(ctx context.Context, name string, src qcow.Image, meta map[string]string) (Volume, error)
	DeleteVolume(ctx context.Context, name string) error

	// ListSnapshots returns the snapshots of a volume, oldest first.
	ListSnapshots(ctx context.Context, volume string) ([]Snapshot, error)
	Snapshot(ctx context.Context, volume, name string) (Snapshot, error)
	// CreateSnapshots snapshots several volumes at one point: no volume
	// is written between the first and the last. name is the snapshot
	// name on every volume.
	CreateSnapshots(ctx context.Context, volumes []string, name string, opts SnapshotOptions) ([]Snapshot, error)
	// DeleteSnapshot removes a snapshot, first moving data that later
	// snapshots or the head still need. ErrBusy while something depends
	// on it.
	DeleteSnapshot(ctx context.Context, volume, name string) error

	// OpenSnapshot returns the flattened, immutable image of a snapshot.
	OpenSnapshot(ctx context.Context, volume, name string) (qcow.Image, error)
	// OpenHead returns the flattened live head (it may change as it is read).
	OpenHead(ctx context.Context, volume string) (qcow.Image, error)
	// Changed returns the extents of snapshot to that differ from snapshot
	// from (same volume chain), as they read in to: Data, or Zero where to
	// reads zeros and from did not. from "" means every extent of to that
	// holds something. A backend may report more than what differs (a
	// range rewritten with the same bytes, or whole objects where its
	// diff is coarse: see RefineChanged), never less.
	Changed(ctx context.Context, volume, from, to string) ([]qcow.Extent, error)
}

// Cloner is implemented by backends that make copy-on-write clones (the
// local store, Ceph RBD). Callers check for it with a type assertion, or go
// through [Manager], which returns ErrUnsupported for other backends.
type Cloner interface {
	// Clone creates volume newName as a copy-on-write clone of snapshot
	// of volume, in O(1): it reads through the snapshot until written, and
	// its Parent names the snapshot, which cannot be deleted (ErrBusy)
	// while the clone exists.
	Clone(ctx context.Context, volume, snapshot, newName string) (Volume, error)
	// Flatten copies into volume, a clone, everything it still reads
	// from its parent, then cuts the link (Parent becomes nil). The
	// context's progress function (WithProgress) sees the copy, and
	// Volume.Flatten shows it meanwhile. Safe to interrupt at any point:
	// the volume reads the same throughout, and a new Flatten starts
	// again. A volume without a parent is left as it is.
	Flatten(ctx context.Context, volume string) error
}

// Reverter is implemented by backends that can make a volume's head read
// as one of its snapshots again.
type Reverter interface {
	// Revert makes the head of volume read exactly as snapshot reads;
	// what the head held is dropped, and every snapshot is kept. Safe to
	// interrupt: the head reads as before, or as the snapshot. ErrBusy
	// while a VM (qemu) has the head open.
	Revert(ctx context.Context, volume, snapshot string) error
}

// Disk is one disk of an instance.
type Disk struct {
	// Device is the guest device name (vda, vdb, ...).
	Device string `json:"device"`
	// Volume is the volume behind it.
	Volume string `json:"volume"`
}

// Instance is a named group of disks, a virtual machine.
type Instance struct {
	Name  string `json:"name"`
	Disks []Disk `json:"disks"`
	// Running instances are frozen for a quiesced snapshot.
	Running bool `json:"running"`
	// Created is when the instance was defined (zero if unknown).
	Created time.Time `json:"created,omitzero"`
}

// SnapshotDisk is one disk of an instance snapshot: which snapshot of which
// volume holds it.
type SnapshotDisk struct {
	Device   string `json:"device"`
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
}

// InstanceSnapshot records a snapshot of every disk of an instance, taken at
// one point.
type InstanceSnapshot struct {
	Instance    string         `json:"instance"`
	Name        string         `json:"name"`
	Created     time.Time      `json:"created"`
	Consistency Consistency    `json:"consistency"`
	Disks       []SnapshotDisk `json:"disks"`
	// Frozen is how long the guest stayed frozen (0 when it was not).
	Frozen   time.Duration     `json:"frozen_ns,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// InstanceSnapshotOptions go with a new instance snapshot. The caller (see
// [Manager]) has quiesced the guest when it could and says so in
// Consistency.
type InstanceSnapshotOptions struct {
	// Consistency to record; "" lets the provider say what it achieved on
	// its own (crash-consistent when it takes every disk at one instant).
	Consistency Consistency
	// FrozenSince is when the guest was frozen (zero if it was not): the
	// provider records the time from then to the snapshot as Frozen.
	FrozenSince time.Time
	Metadata    map[string]string
}

// InstanceProvider lists instances and their disks, can quiesce a guest, and
// takes and keeps instance snapshots. [Manager] orchestrates a consistent
// snapshot over any provider: freeze, CreateInstanceSnapshot, thaw.
type InstanceProvider interface {
	ListInstances(ctx context.Context) ([]Instance, error)
	Instance(ctx context.Context, name string) (Instance, error)
	// Freeze quiesces the guest filesystems and returns the function that
	// thaws them. ErrUnsupported when the instance has no guest agent.
	Freeze(ctx context.Context, name string) (thaw func(context.Context) error, err error)

	// ListInstanceSnapshots returns the snapshots of an instance, oldest
	// first.
	ListInstanceSnapshots(ctx context.Context, instance string) ([]InstanceSnapshot, error)
	InstanceSnapshot(ctx context.Context, instance, name string) (InstanceSnapshot, error)
	// CreateInstanceSnapshot snapshots every disk of the instance at one
	// point, under the same snapshot name on each volume, and records the
	// device mapping. It does not freeze: the caller has done that.
	CreateInstanceSnapshot(ctx context.Context, instance, name string, opts InstanceSnapshotOptions) (InstanceSnapshot, error)
	// DeleteInstanceSnapshot deletes the record and every disk snapshot it
	// holds.
	DeleteInstanceSnapshot(ctx context.Context, instance, name string) error
}
