package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"snapfs/qcow"
)

// Restoring snapshot folders copied out of the mount (see exchange.go):
// an instance snapshot folder becomes new volumes plus an instance with
// the same device mapping; a volume snapshot folder (or its disk file with
// the meta.json beside it) becomes a new volume. Everything in a folder is
// untrusted: meta.json is validated, symlinks are refused, and every disk
// goes through OpenUntrusted, as an import does.
//
// # Names
//
// A restored volume is named NAME when one is given, else after the volume
// in meta.json: VOL if that name is free, else VOL-restored, VOL-restored-2,
// ... VOL-restored-99. A restored instance is named likewise after the
// instance in meta.json, and its disks become volumes named INSTANCE-DEVICE
// (web-vda, web-vdb): the first candidate for which the instance and all
// of its volumes are free is taken. A NAME given that is taken is
// ErrExists.
//
// # What is restored
//
// Each disk's content becomes the bottom layer of its new volume, as a
// snapshot under its original name, creation time, consistency and user
// metadata, with an empty head on top; the volume gets the volume's user
// metadata. An instance gets the device mapping and an instance snapshot
// record (name, time, consistency, metadata) over those snapshots. So the
// restored tree shows the snapshot folder that was copied out, reading
// byte for byte the same.

// Restorer is a backend that creates several volumes, and an instance over
// them, in one atomic step: all appear, or nothing. The local store is one.
type Restorer interface {
	Backend
	InstanceProvider
	// Restore creates what spec describes. The images are untrusted
	// (opened with OpenUntrusted, or OpenStaged when the caller gives
	// their files up); the caller closes them afterwards. The context's
	// progress function (WithProgress) sees the copy.
	Restore(ctx context.Context, spec RestoreSpec) error
}

// RestoreSpec is what Restorer.Restore creates.
type RestoreSpec struct {
	Volumes []VolumeRestore
	// Instance, when set, is defined over the new volumes.
	Instance *InstanceRestore
}

// VolumeRestore is one new volume of a restore.
type VolumeRestore struct {
	Name     string
	Image    qcow.Image
	Metadata map[string]string
	// Snapshot, when its Name is set, makes the restored content a
	// snapshot of the new volume, under its empty head.
	Snapshot SnapshotRestore
}

// SnapshotRestore is a snapshot as it was recorded where it came from.
type SnapshotRestore struct {
	Name        string
	Created     time.Time
	Consistency Consistency
	Metadata    map[string]string
}

// InstanceRestore is the instance of a restore.
type InstanceRestore struct {
	Name  string
	Disks []Disk
	// Snapshot, when its Name is set, records an instance snapshot over
	// the volumes' snapshots, which must all have that name.
	Snapshot SnapshotRestore
	Frozen   time.Duration
}

// Restored says what a restore created: a volume, or an instance.
type Restored struct {
	Volume   *Volume   `json:"volume,omitempty"`
	Instance *Instance `json:"instance,omitempty"`
	// Volumes are the new volumes (one for a volume restore).
	Volumes []Volume `json:"volumes"`
}

// RestoreDir restores the snapshot folder dir, copied out of the mount:
// an instance or a volume, as its meta.json says. name ("" for the
// default, see Names above) names the new volume or instance.
func RestoreDir(ctx context.Context, r Restorer, dir, name string) (Restored, error) {
	return restoreDir(ctx, r, dir, name, false)
}

// RestoreStaged is RestoreDir for a folder the caller gives up once it is
// restored: a staged copy, as the mount's import/ writes. Its disk files
// are opened as StagedImages, so that a store on the same filesystem
// moves them in instead of copying them (the local store does). The
// caller removes what is left of dir afterwards, whatever the outcome.
func RestoreStaged(ctx context.Context, r Restorer, dir, name string) (Restored, error) {
	return restoreDir(ctx, r, dir, name, true)
}

func restoreDir(ctx context.Context, r Restorer, dir, name string, staged bool) (Restored, error) {
	metaPath := filepath.Join(dir, MetaFileName)
	kind, err := metaKind(metaPath)
	if errors.Is(err, fs.ErrNotExist) {
		return Restored{}, &ImportError{
			Msg: fmt.Sprintf("restore: %s has no %s; copy the whole snapshot folder (volumes/V/snapshots/S or instances/I/snapshots/S)", dir, MetaFileName),
			Err: err,
		}
	}
	if err != nil {
		return Restored{}, err
	}
	switch kind {
	case KindInstanceSnapshot:
		return restoreInstance(ctx, r, dir, name, staged)
	case KindVolumeSnapshot:
		disk, err := DiskFile(dir, VolumeDiskName)
		if err != nil {
			return Restored{}, err
		}
		return restoreVolume(ctx, r, disk, metaPath, name, staged)
	}
	return Restored{}, metaError(metaPath, "kind %q; want %q or %q", kind, KindVolumeSnapshot, KindInstanceSnapshot)
}

// RestoreName is the name to restore the folder dir under, when it was
// copied into the mount's import/ (or given to a command) as it is: ""
// (the default names, see Names above) when the folder still has the
// snapshot's name, as after cp -r backup/nightly MOUNT/import/, else the
// folder's name, as after cp -r backup/nightly MOUNT/import/web2. It reads
// meta.json, untrusted; on any problem it returns the folder's name, and
// the restore itself reports the problem.
func RestoreName(dir string) string {
	base := filepath.Base(filepath.Clean(dir))
	metaPath := filepath.Join(dir, MetaFileName)
	var head struct {
		Kind string `json:"kind"`
		Name string `json:"name"`
	}
	kind, err := metaKind(metaPath)
	if err != nil || (kind != KindVolumeSnapshot && kind != KindInstanceSnapshot) {
		return base
	}
	if err := readMetaFile(metaPath, kind, &head); err != nil || head.Name != base {
		return base
	}
	return ""
}

// RestoreVolume restores a volume from a disk image exported by snapfs
// (disk.qcow2 or disk.raw; any raw or qcow2 image of the size meta.json
// says) and its meta.json (a VolumeSnapshotMeta). name "" picks one (see
// Names above).
func RestoreVolume(ctx context.Context, r Restorer, diskPath, metaPath, name string) (Volume, error) {
	res, err := restoreVolume(ctx, r, diskPath, metaPath, name, false)
	if err != nil {
		return Volume{}, err
	}
	return *res.Volume, nil
}

// RestoreInstance restores an instance snapshot folder dir (meta.json, an
// InstanceSnapshotMeta, and DEVICE.qcow2 or DEVICE.raw for each disk) as
// new volumes and an instance over them with the same device mapping.
// name "" picks one (see Names above).
func RestoreInstance(ctx context.Context, r Restorer, dir, name string) (Instance, error) {
	res, err := restoreInstance(ctx, r, dir, name, false)
	if err != nil {
		return Instance{}, err
	}
	return *res.Instance, nil
}

// RestoreReady reports whether the snapshot folder dir holds everything a
// restore needs: a valid meta.json and, for each disk, DISK.qcow2 or
// DISK.raw. For the mount, which restores a folder copied into import/
// once it is complete. An invalid meta.json is an error.
func RestoreReady(dir string) (bool, error) {
	metaPath := filepath.Join(dir, MetaFileName)
	kind, err := metaKind(metaPath)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var disks []string
	switch kind {
	case KindVolumeSnapshot:
		var meta VolumeSnapshotMeta
		if err := readMetaFile(metaPath, kind, &meta); err != nil {
			return false, err
		}
		if err := meta.check(metaPath); err != nil {
			return false, err
		}
		disks = []string{VolumeDiskName}
	case KindInstanceSnapshot:
		var meta InstanceSnapshotMeta
		if err := readMetaFile(metaPath, kind, &meta); err != nil {
			return false, err
		}
		if err := meta.check(metaPath); err != nil {
			return false, err
		}
		for _, d := range meta.Disks {
			disks = append(disks, d.Device)
		}
	default:
		return false, metaError(metaPath, "kind %q; want %q or %q", kind, KindVolumeSnapshot, KindInstanceSnapshot)
	}
	for _, d := range disks {
		if _, err := DiskFile(dir, d); errors.Is(err, fs.ErrNotExist) {
			return false, nil
		} else if err != nil {
			return false, err
		}
	}
	return true, nil
}

// DiskFile returns the file of disk base (VolumeDiskName, or a device
// name) in a snapshot folder: base.qcow2, else base.raw. Neither is an
// error wrapping fs.ErrNotExist.
func DiskFile(dir, base string) (string, error) {
	for _, ext := range []string{".qcow2", ".raw"} {
		path := filepath.Join(dir, base+ext)
		if _, err := os.Lstat(path); err == nil {
			return path, nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
	}
	return "", &ImportError{
		Msg: fmt.Sprintf("restore: %s has neither %s.qcow2 nor %s.raw", dir, base, base),
		Err: fs.ErrNotExist,
	}
}

// openRestoreDisk opens a disk file of a folder as untrusted input (a
// StagedImage when staged) and checks its size against meta.json's.
func openRestoreDisk(path string, size int64, staged bool) (qcow.Image, error) {
	f, err := openRegular(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	img, err := OpenUntrustedFile(regularFile{File: f, size: st.Size()})
	if err != nil {
		return nil, inRestore(path, err)
	}
	if got := roundToSector(img.Size()); got != size {
		img.Close()
		return nil, &ImportError{
			Msg: fmt.Sprintf("restore: %s: the disk is %d bytes, meta.json says %d: not the disk of this snapshot", path, img.Size(), size),
			Err: qcow.ErrLimit,
		}
	}
	if staged {
		return &StagedImage{Image: img, path: path}, nil
	}
	return img, nil
}

// inRestore names the file in an import refusal.
func inRestore(path string, err error) error {
	var ie *ImportError
	if errors.As(err, &ie) {
		return &ImportError{Msg: fmt.Sprintf("%s: %s", path, ie.Msg), Err: ie.Err}
	}
	return fmt.Errorf("%s: %w", path, err)
}

// regularFile adapts an open *os.File to qcow.File.
type regularFile struct {
	*os.File
	size int64
}

func (f regularFile) Size() int64 { return f.size }

func restoreVolume(ctx context.Context, r Restorer, diskPath, metaPath, name string, staged bool) (Restored, error) {
	var meta VolumeSnapshotMeta
	if err := readMetaFile(metaPath, KindVolumeSnapshot, &meta); err != nil {
		return Restored{}, err
	}
	if err := meta.check(metaPath); err != nil {
		return Restored{}, err
	}
	name, err := pickName(ctx, name, meta.Volume, func(n string) ([]string, string) { return []string{n}, "" }, r)
	if err != nil {
		return Restored{}, err
	}
	img, err := openRestoreDisk(diskPath, meta.Size, staged)
	if err != nil {
		return Restored{}, err
	}
	defer img.Close()
	spec := RestoreSpec{Volumes: []VolumeRestore{{
		Name:     name,
		Image:    img,
		Metadata: meta.VolumeMetadata,
		Snapshot: SnapshotRestore{Name: meta.Name, Created: meta.Created, Consistency: meta.Consistency, Metadata: meta.Metadata},
	}}}
	if err := r.Restore(ctx, spec); err != nil {
		return Restored{}, err
	}
	v, err := r.Volume(ctx, name)
	if err != nil {
		return Restored{}, err
	}
	return Restored{Volume: &v, Volumes: []Volume{v}}, nil
}

func restoreInstance(ctx context.Context, r Restorer, dir, name string, staged bool) (Restored, error) {
	metaPath := filepath.Join(dir, MetaFileName)
	var meta InstanceSnapshotMeta
	if err := readMetaFile(metaPath, KindInstanceSnapshot, &meta); err != nil {
		return Restored{}, err
	}
	if err := meta.check(metaPath); err != nil {
		return Restored{}, err
	}
	volumesOf := func(inst string) ([]string, string) {
		var vols []string
		for _, d := range meta.Disks {
			vols = append(vols, inst+"-"+d.Device)
		}
		return vols, inst
	}
	name, err := pickName(ctx, name, meta.Instance, volumesOf, r)
	if err != nil {
		return Restored{}, err
	}
	vols, _ := volumesOf(name)
	spec := RestoreSpec{Instance: &InstanceRestore{
		Name:     name,
		Snapshot: SnapshotRestore{Name: meta.Name, Created: meta.Created, Consistency: meta.Consistency, Metadata: meta.Metadata},
		Frozen:   meta.Frozen,
	}}
	defer func() {
		for _, v := range spec.Volumes {
			v.Image.Close()
		}
	}()
	for i, d := range meta.Disks {
		path, err := DiskFile(dir, d.Device)
		if err != nil {
			return Restored{}, err
		}
		img, err := openRestoreDisk(path, d.Size, staged)
		if err != nil {
			return Restored{}, err
		}
		spec.Volumes = append(spec.Volumes, VolumeRestore{
			Name:     vols[i],
			Image:    img,
			Metadata: d.VolumeMetadata,
			Snapshot: SnapshotRestore{Name: meta.Name, Created: meta.Created, Consistency: meta.Consistency, Metadata: d.Metadata},
		})
		spec.Instance.Disks = append(spec.Instance.Disks, Disk{Device: d.Device, Volume: vols[i]})
	}
	if err := r.Restore(ctx, spec); err != nil {
		return Restored{}, err
	}
	in, err := r.Instance(ctx, name)
	if err != nil {
		return Restored{}, err
	}
	out := Restored{Instance: &in}
	for _, vol := range vols {
		v, err := r.Volume(ctx, vol)
		if err != nil {
			return Restored{}, err
		}
		out.Volumes = append(out.Volumes, v)
	}
	return out, nil
}

// maxRestoreSuffix bounds the "-restored-N" names tried.
const maxRestoreSuffix = 99

// pickName returns name if given (checked), else the first free candidate
// after base (see Names above). names maps a candidate to the volumes and
// the instance ("" for none) it would create; all must be free and valid.
func pickName(ctx context.Context, name, base string, names func(string) ([]string, string), r Restorer) (string, error) {
	valid := func(cand string) error {
		vols, inst := names(cand)
		if inst != "" {
			if err := CheckInstanceName(inst); err != nil {
				return err
			}
		}
		for _, v := range vols {
			if err := CheckVolumeName(v); err != nil {
				return err
			}
		}
		return nil
	}
	free := func(cand string) (bool, error) {
		vols, inst := names(cand)
		if inst != "" {
			if _, err := r.Instance(ctx, inst); err == nil {
				return false, nil
			} else if !errors.Is(err, ErrNotFound) {
				return false, err
			}
		}
		for _, v := range vols {
			if _, err := r.Volume(ctx, v); err == nil {
				return false, nil
			} else if !errors.Is(err, ErrNotFound) {
				return false, err
			}
		}
		return true, nil
	}
	if name != "" {
		if err := valid(name); err != nil {
			return "", err
		}
		if ok, err := free(name); err != nil {
			return "", err
		} else if !ok {
			vols, inst := names(name)
			if inst != "" {
				return "", fmt.Errorf("%w: instance %q or one of its volumes (%v)", ErrExists, inst, vols)
			}
			return "", fmt.Errorf("%w: volume %q", ErrExists, name)
		}
		return name, nil
	}
	for i := 0; i <= maxRestoreSuffix; i++ {
		cand := base
		switch {
		case i == 1:
			cand = base + "-restored"
		case i > 1:
			cand = fmt.Sprintf("%s-restored-%d", base, i)
		}
		if valid(cand) != nil {
			continue
		}
		if ok, err := free(cand); err != nil {
			return "", err
		} else if ok {
			return cand, nil
		}
	}
	return "", fmt.Errorf("%w: %q and its -restored names up to -restored-%d are all taken; give a name", ErrExists, base, maxRestoreSuffix)
}
