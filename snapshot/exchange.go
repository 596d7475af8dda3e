package snapshot

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
)

// The meta.json files of the mount: what a snapshot folder copied out of
// the tree says about itself, and what a restore reads back. They are
// defined here, in one place, for the writer (package fs) and the reader
// (RestoreVolume, RestoreInstance).
//
// A volume snapshot folder (volumes/V/snapshots/S/):
//
//	disk.qcow2   disk.raw   meta.json (VolumeSnapshotMeta)   since/...
//
// An instance snapshot folder (instances/I/snapshots/S/):
//
//	vda.qcow2 vda.raw  vdb.qcow2 vdb.raw ...   meta.json (InstanceSnapshotMeta)
//
// Either disk file of a disk is enough to restore it (the qcow2 one is
// preferred: it is smaller); the format is probed from the content.

// The kinds of meta.json, in their "kind" field.
const (
	KindVolumeSnapshot   = "volume-snapshot"
	KindInstanceSnapshot = "instance-snapshot"
)

// MetaVersion is the version of the meta.json formats written. A reader
// refuses a newer one: its fields may mean something it does not know.
const MetaVersion = 1

// MetaFileName is the name of the metadata file in a snapshot folder.
const MetaFileName = "meta.json"

// VolumeDiskName is the base name of a volume snapshot's disk files
// (disk.qcow2, disk.raw); an instance snapshot's are named after their
// device (vda.qcow2).
const VolumeDiskName = "disk"

// maxMetaFileBytes bounds a meta.json read back: each user metadata map is
// at most maxMetadataBytes, and an instance has at most maxRestoreDisks.
const maxMetaFileBytes = 4 << 20

// maxRestoreDisks bounds the disks of an instance restored from a folder.
const maxRestoreDisks = 64

// VolumeSnapshotMeta is meta.json in a volume snapshot folder
// (volumes/V/snapshots/S/meta.json).
type VolumeSnapshotMeta struct {
	// Kind is KindVolumeSnapshot; Version is MetaVersion.
	Kind    string `json:"kind"`
	Version int    `json:"version"`

	Volume  string    `json:"volume"`
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	// Size is the virtual size of the disk, in bytes.
	Size int64 `json:"size"`
	// Parent is the previous snapshot of the volume ("" for the first).
	Parent      string      `json:"parent,omitempty"`
	Consistency Consistency `json:"consistency"`
	// Method is how the backend took it with the other disks of its
	// instance snapshot, where it says (Snapshot.Method).
	Method string `json:"method,omitempty"`
	// Metadata is the snapshot's user metadata.
	Metadata map[string]string `json:"metadata,omitempty"`
	// Instance is set when the snapshot belongs to an instance snapshot.
	Instance string `json:"instance,omitempty"`
	// VolumeMetadata is the volume's user metadata.
	VolumeMetadata map[string]string `json:"volume_metadata,omitempty"`
	// VolumeParent is the snapshot the volume was cloned from, if any.
	VolumeParent *SnapshotRef `json:"volume_parent,omitempty"`
}

// InstanceSnapshotMeta is meta.json in an instance snapshot folder
// (instances/I/snapshots/S/meta.json): the device mapping, and for each
// disk what a restore needs.
type InstanceSnapshotMeta struct {
	// Kind is KindInstanceSnapshot; Version is MetaVersion.
	Kind    string `json:"kind"`
	Version int    `json:"version"`

	Instance    string      `json:"instance"`
	Name        string      `json:"name"`
	Created     time.Time   `json:"created"`
	Consistency Consistency `json:"consistency"`
	// Frozen is how long the guest stayed frozen (0 when it was not).
	Frozen time.Duration `json:"frozen_ns,omitempty"`
	// Metadata is the instance snapshot's user metadata.
	Metadata map[string]string `json:"metadata,omitempty"`
	Disks    []DiskMeta        `json:"disks"`
}

// DiskMeta is one disk of an instance snapshot folder: its files are
// DEVICE.qcow2 and DEVICE.raw.
type DiskMeta struct {
	Device   string `json:"device"`
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
	// Size is the virtual size of the disk, in bytes.
	Size int64 `json:"size"`
	// Method is how the backend took this disk's snapshot with the
	// others (Snapshot.Method), where it says.
	Method string `json:"method,omitempty"`
	// Metadata is the disk snapshot's user metadata, VolumeMetadata the
	// volume's.
	Metadata       map[string]string `json:"metadata,omitempty"`
	VolumeMetadata map[string]string `json:"volume_metadata,omitempty"`
}

// VolumeSnapshotMetaFor returns the meta.json of snapshot snap of volume.
func VolumeSnapshotMetaFor(ctx context.Context, b Backend, volume, snap string) (VolumeSnapshotMeta, error) {
	s, err := b.Snapshot(ctx, volume, snap)
	if err != nil {
		return VolumeSnapshotMeta{}, err
	}
	v, err := b.Volume(ctx, volume)
	if err != nil {
		return VolumeSnapshotMeta{}, err
	}
	return VolumeSnapshotMeta{
		Kind:           KindVolumeSnapshot,
		Version:        MetaVersion,
		Volume:         volume,
		Name:           s.Name,
		Created:        s.Created,
		Size:           s.Size,
		Parent:         s.Parent,
		Consistency:    s.Consistency,
		Method:         s.Method,
		Metadata:       s.Metadata,
		Instance:       s.Instance,
		VolumeMetadata: v.Metadata,
		VolumeParent:   v.Parent,
	}, nil
}

// InstanceSnapshotMetaFor returns the meta.json of snapshot snap of
// instance, with each disk's sizes and metadata from the backend.
func InstanceSnapshotMetaFor(ctx context.Context, b Backend, p InstanceProvider, instance, snap string) (InstanceSnapshotMeta, error) {
	rec, err := p.InstanceSnapshot(ctx, instance, snap)
	if err != nil {
		return InstanceSnapshotMeta{}, err
	}
	meta := InstanceSnapshotMeta{
		Kind:        KindInstanceSnapshot,
		Version:     MetaVersion,
		Instance:    rec.Instance,
		Name:        rec.Name,
		Created:     rec.Created,
		Consistency: rec.Consistency,
		Frozen:      rec.Frozen,
		Metadata:    rec.Metadata,
		Disks:       []DiskMeta{},
	}
	for _, d := range rec.Disks {
		s, err := b.Snapshot(ctx, d.Volume, d.Snapshot)
		if err != nil {
			return InstanceSnapshotMeta{}, fmt.Errorf("disk %s: %w", d.Device, err)
		}
		v, err := b.Volume(ctx, d.Volume)
		if err != nil {
			return InstanceSnapshotMeta{}, fmt.Errorf("disk %s: %w", d.Device, err)
		}
		meta.Disks = append(meta.Disks, DiskMeta{
			Device: d.Device, Volume: d.Volume, Snapshot: d.Snapshot, Size: s.Size,
			Method: s.Method, Metadata: s.Metadata, VolumeMetadata: v.Metadata,
		})
	}
	return meta, nil
}

// metaError is a refused meta.json: an *ImportError (ErrInvalid, EINVAL at
// the mount) that names the file.
func metaError(path, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return &ImportError{Msg: fmt.Sprintf("restore: %s: %s", path, msg), Err: errors.New(msg)}
}

// readMetaFile reads a meta.json as untrusted input: a regular file (a
// symlink is refused, as everywhere in a restore), at most
// maxMetaFileBytes, holding one JSON object of kind want whose version this
// snapfs reads. It decodes it into v.
func readMetaFile(path, want string, v any) error {
	f, err := openRegular(path)
	if err != nil {
		return err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxMetaFileBytes+1))
	if err != nil {
		return err
	}
	if len(data) > maxMetaFileBytes {
		return metaError(path, "more than %d bytes; not a snapfs meta.json", maxMetaFileBytes)
	}
	var head struct {
		Kind    string `json:"kind"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return metaError(path, "not JSON: %v", err)
	}
	if head.Kind != want {
		return metaError(path, "kind %q; want %q (a folder copied from %s)", head.Kind, want, folderOf(want))
	}
	if head.Version < 1 || head.Version > MetaVersion {
		return metaError(path, "version %d; this snapfs reads versions 1 to %d", head.Version, MetaVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return metaError(path, "%v", err)
	}
	return nil
}

// MetaKind returns the kind of the snapfs meta.json at path
// (KindVolumeSnapshot, KindInstanceSnapshot, or what else it says), read
// as untrusted input like every file of a restore.
func MetaKind(path string) (string, error) { return metaKind(path) }

func metaKind(path string) (string, error) {
	var head struct {
		Kind string `json:"kind"`
	}
	f, err := openRegular(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxMetaFileBytes+1))
	if err != nil {
		return "", err
	}
	if err := json.Unmarshal(data, &head); err != nil || len(data) > maxMetaFileBytes {
		return "", metaError(path, "not a snapfs meta.json")
	}
	return head.Kind, nil
}

func folderOf(kind string) string {
	if kind == KindInstanceSnapshot {
		return "instances/INSTANCE/snapshots/SNAP"
	}
	return "volumes/VOLUME/snapshots/SNAP"
}

// check validates a volume snapshot meta.json read from path.
func (m *VolumeSnapshotMeta) check(path string) error {
	if err := CheckVolumeName(m.Volume); err != nil {
		return metaError(path, "%v", err)
	}
	if err := CheckSnapshotName(m.Name); err != nil {
		return metaError(path, "%v", err)
	}
	if m.Size <= 0 || m.Size > MaxVolumeSize {
		return metaError(path, "size %d", m.Size)
	}
	if err := checkRestoredConsistency(m.Consistency); err != nil {
		return metaError(path, "%v", err)
	}
	if err := checkMetadata(m.Metadata); err != nil {
		return metaError(path, "snapshot metadata: %v", err)
	}
	if err := checkMetadata(m.VolumeMetadata); err != nil {
		return metaError(path, "volume metadata: %v", err)
	}
	return nil
}

// check validates an instance snapshot meta.json read from path.
func (m *InstanceSnapshotMeta) check(path string) error {
	if err := CheckInstanceName(m.Instance); err != nil {
		return metaError(path, "%v", err)
	}
	if err := CheckSnapshotName(m.Name); err != nil {
		return metaError(path, "%v", err)
	}
	if err := checkRestoredConsistency(m.Consistency); err != nil {
		return metaError(path, "%v", err)
	}
	if err := checkMetadata(m.Metadata); err != nil {
		return metaError(path, "metadata: %v", err)
	}
	if m.Frozen < 0 {
		return metaError(path, "frozen_ns %d", m.Frozen)
	}
	if len(m.Disks) == 0 || len(m.Disks) > maxRestoreDisks {
		return metaError(path, "%d disks; want 1 to %d", len(m.Disks), maxRestoreDisks)
	}
	devices := map[string]bool{}
	for _, d := range m.Disks {
		if err := CheckDeviceName(d.Device); err != nil {
			return metaError(path, "%v", err)
		}
		if devices[d.Device] {
			return metaError(path, "device %q twice", d.Device)
		}
		devices[d.Device] = true
		if d.Size <= 0 || d.Size > MaxVolumeSize {
			return metaError(path, "disk %s: size %d", d.Device, d.Size)
		}
		if err := checkMetadata(d.Metadata); err != nil {
			return metaError(path, "disk %s: snapshot metadata: %v", d.Device, err)
		}
		if err := checkMetadata(d.VolumeMetadata); err != nil {
			return metaError(path, "disk %s: volume metadata: %v", d.Device, err)
		}
	}
	return nil
}

// checkRestoredConsistency accepts a known level, or none recorded.
func checkRestoredConsistency(c Consistency) error {
	if c == "" {
		return nil
	}
	return c.check()
}

// openRegular opens path for reading, refusing symlinks (O_NOFOLLOW) and
// anything that is not a regular file: a folder to restore is untrusted,
// and a link in it must not make snapfs read a file its owner could not.
func openRegular(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, &ImportError{Msg: fmt.Sprintf("restore: %s is a symbolic link; copy the file itself", path), Err: err}
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, &ImportError{Msg: fmt.Sprintf("restore: %s is not a regular file", path), Err: ErrInvalid}
	}
	return f, nil
}
