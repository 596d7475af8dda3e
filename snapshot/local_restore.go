package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"snapfs/qcow"
)

var _ Restorer = (*LocalStore)(nil)

// Restore implements [Restorer]: every volume of spec is written (a base
// layer, flattened from its image or taken over from a StagedImage's
// file, under an empty head), then the volumes
// and the instance appear in one metadata commit. On any error, or if the
// process dies, nothing appears and the files are removed (at once, or by
// the next OpenLocal).
func (s *LocalStore) Restore(ctx context.Context, spec RestoreSpec) error {
	return s.createVolumes(ctx, spec, PauseRestoreConverting, PauseRestoreWritten)
}

// checkSpec refuses a restore spec the store cannot take as it is.
func checkSpec(spec RestoreSpec) error {
	if len(spec.Volumes) == 0 {
		return fmt.Errorf("%w: nothing to restore", ErrInvalid)
	}
	vols := map[string]*VolumeRestore{}
	for i := range spec.Volumes {
		v := &spec.Volumes[i]
		if err := CheckVolumeName(v.Name); err != nil {
			return err
		}
		if vols[v.Name] != nil {
			return fmt.Errorf("%w: volume %q given twice", ErrInvalid, v.Name)
		}
		vols[v.Name] = v
		if err := checkImportSize(v.Image.Size()); err != nil {
			return err
		}
		if err := checkMetadata(v.Metadata); err != nil {
			return err
		}
		if sn := v.Snapshot; sn.Name != "" {
			if err := CheckNewSnapshotName(sn.Name); err != nil {
				return err
			}
			if err := checkRestoredConsistency(sn.Consistency); err != nil {
				return err
			}
			if err := checkMetadata(sn.Metadata); err != nil {
				return err
			}
		}
	}
	in := spec.Instance
	if in == nil {
		return nil
	}
	if err := CheckInstanceName(in.Name); err != nil {
		return err
	}
	if len(in.Disks) == 0 {
		return fmt.Errorf("%w: instance %q has no disks", ErrInvalid, in.Name)
	}
	if err := checkMetadata(in.Snapshot.Metadata); err != nil {
		return err
	}
	devices, used := map[string]bool{}, map[string]bool{}
	for _, d := range in.Disks {
		if err := CheckDeviceName(d.Device); err != nil {
			return err
		}
		v := vols[d.Volume]
		switch {
		case devices[d.Device]:
			return fmt.Errorf("%w: device %q given twice", ErrInvalid, d.Device)
		case v == nil:
			return fmt.Errorf("%w: disk %s: volume %q is not restored with the instance", ErrInvalid, d.Device, d.Volume)
		case used[d.Volume]:
			return fmt.Errorf("%w: volume %q given twice", ErrInvalid, d.Volume)
		case in.Snapshot.Name != "" && v.Snapshot.Name != in.Snapshot.Name:
			return fmt.Errorf("%w: disk %s: its snapshot is %q, the instance snapshot's %q", ErrInvalid, d.Device, v.Snapshot.Name, in.Snapshot.Name)
		}
		devices[d.Device], used[d.Volume] = true, true
	}
	return nil
}

// createVolumes writes and commits the volumes (and instance) of spec, for
// ImportVolume and Restore, which stop at their own pause points.
func (s *LocalStore) createVolumes(ctx context.Context, spec RestoreSpec, pauseConverting, pauseWritten string) error {
	if err := checkSpec(spec); err != nil {
		return err
	}
	var names []string
	for _, v := range spec.Volumes {
		names = append(names, v.Name)
	}
	exist := func(m *storeMeta) error {
		for _, n := range names {
			if m.Volumes[n] != nil {
				return fmt.Errorf("%w: volume %q", ErrExists, n)
			}
		}
		if in := spec.Instance; in != nil && m.Instances[in.Name] != nil {
			return fmt.Errorf("%w: instance %q", ErrExists, in.Name)
		}
		return nil
	}
	release, err := s.lockVolumes(ctx, names...)
	if err != nil {
		return err
	}
	defer release()
	if m, err := s.load(); err != nil {
		return err
	} else if err := exist(m); err != nil {
		return err
	}

	var files []*newFile
	committed := false
	defer func() {
		for _, nf := range files {
			if committed {
				nf.release()
			} else {
				nf.discard()
			}
		}
	}()
	// The copies run one after the other; the progress reported is the
	// sum over the volumes started so far.
	report := ProgressFrom(ctx)
	var mu sync.Mutex
	dones, totals := make([]int64, len(spec.Volumes)), make([]int64, len(spec.Volumes))
	bases, heads, sizes := make([]string, len(spec.Volumes)), make([]string, len(spec.Volumes)), make([]int64, len(spec.Volumes))
	for i, v := range spec.Volumes {
		src := padToSector(v.Image)
		sizes[i] = src.Size()
		progress := func(done, total int64) {
			mu.Lock()
			dones[i], totals[i] = done, total
			var d, t int64
			for k := range dones {
				d, t = d+dones[k], t+totals[k]
			}
			mu.Unlock()
			if report != nil {
				report(d, t)
			}
			if done > 0 {
				pauseAt(pauseConverting)
			}
		}
		base, err := s.adoptFile(ctx, v.Image, sizes[i])
		if err != nil {
			return err
		}
		if base == nil {
			if base, err = s.copyFile(ctx, v.Image, sizes[i], progress); err != nil {
				return err
			}
		}
		if base != nil {
			files = append(files, base)
			progress(sizes[i], sizes[i])
		} else {
			if base, err = s.createFile(newLayerName(), true); err != nil {
				return err
			}
			files = append(files, base)
			err = qcow.Convert(ctx, base.f, src, qcow.ConvertOptions{Format: qcow.FormatQcow2, Progress: progress})
			if err != nil {
				return importRefusal(err)
			}
		}
		if err := base.publish(layerMode(false)); err != nil {
			return err
		}
		head, err := s.createFile(newLayerName(), true)
		if err != nil {
			return err
		}
		files = append(files, head)
		if err := qcow.CreateOverlay(head.f, sizes[i], 0, filepath.Base(base.final), "qcow2"); err != nil {
			return err
		}
		if err := head.publish(layerMode(true)); err != nil {
			return err
		}
		bases[i], heads[i] = filepath.Base(base.final), filepath.Base(head.final)
	}
	if err := s.syncLayers(); err != nil {
		return err
	}
	pauseAt(pauseWritten)
	err = s.commit(ctx, func(m *storeMeta) error {
		if err := exist(m); err != nil {
			return err
		}
		created := now()
		owner := ""
		if in := spec.Instance; in != nil && in.Snapshot.Name != "" {
			owner = in.Name
		}
		for i, v := range spec.Volumes {
			layer := layerMeta{File: bases[i]}
			if sn := v.Snapshot; sn.Name != "" {
				layer.Snapshot = &snapshotMeta{
					Name: sn.Name, Created: restoredTime(sn.Created, created), Consistency: restoredConsistency(sn.Consistency),
					Metadata: copyMetadata(sn.Metadata), Instance: owner,
				}
			}
			m.Volumes[v.Name] = &volumeMeta{
				Created:  created,
				Size:     sizes[i],
				Layers:   []layerMeta{layer},
				Head:     heads[i],
				Metadata: copyMetadata(v.Metadata),
			}
		}
		if in := spec.Instance; in != nil {
			im := &instanceMeta{Created: created, Disks: append([]Disk(nil), in.Disks...)}
			if sn := in.Snapshot; sn.Name != "" {
				rec := instanceSnapshotMeta{
					Name: sn.Name, Created: restoredTime(sn.Created, created), Consistency: restoredConsistency(sn.Consistency),
					Frozen: in.Frozen, Metadata: copyMetadata(sn.Metadata),
				}
				for _, d := range in.Disks {
					rec.Disks = append(rec.Disks, SnapshotDisk{Device: d.Device, Volume: d.Volume, Snapshot: sn.Name})
				}
				im.Snapshots = []instanceSnapshotMeta{rec}
			}
			m.Instances[in.Name] = im
		}
		return nil
	})
	if err != nil {
		return err
	}
	committed = true
	return nil
}

// adoptFile moves the file of a staged image (see StagedImage) into the
// store, to be a base layer as it is instead of a copy, and returns it as
// a newFile, guarded from the sweep until the commit. It returns nil, and
// no error, when the image is to be copied instead: not staged, not a
// qcow2 the store keeps as it is (adoptable), on another filesystem, or
// still open for writing somewhere.
//
// Once moved, the file is in the store's private directory and no
// longer at the caller's path; the checks of OpenUntrusted run again on
// it, so that the bytes kept are the bytes checked whatever happened to
// the path meanwhile. A crash before the rename leaves the file to the
// caller's sweep (the mount's staging directory), after it to the
// store's: it is a temp file of layers/ until the commit.
func (s *LocalStore) adoptFile(ctx context.Context, img qcow.Image, size int64) (*newFile, error) {
	staged, ok := img.(*StagedImage)
	if !ok || adoptable(staged.Image, size) != nil {
		return nil, nil
	}
	// Read-only: the store never writes a base layer, and a read lease
	// (noWriters) is only granted on a read-only descriptor.
	f, err := os.OpenFile(staged.path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, err
	}
	// A read lock keeps the sweep (removeIfUnlocked) away as well as the
	// write lock of the files the store writes does.
	if err := tryLock(f, syscall.F_RDLCK, sweepLockOff, 1); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", staged.path, err)
	}
	pauseAt(PauseImportAdopting)
	tmp := s.layerPath(tempPrefix + randomHex())
	if err := os.Rename(staged.path, tmp); err != nil {
		f.Close()
		if errors.Is(err, syscall.EXDEV) {
			return nil, nil
		}
		return nil, err
	}
	nf := &newFile{f: f, path: tmp, final: s.layerPath(newLayerName()), fresh: true}
	if noWriters(f) != nil {
		// The staged image still reads the file through its own
		// descriptor: copy from it, and drop what was moved.
		nf.discard()
		return nil, nil
	}
	if err := checkKept(ctx, nf.path, staged.path, size); err != nil {
		nf.discard()
		return nil, err
	}
	return nf, nil
}

// checkKept runs the checks of OpenUntrusted and adoptable again on the
// file at path, which the store is about to keep as a layer: a copy or a
// move of the image file at source, checked before, which may have
// changed since. It also inflates every compressed cluster: a conversion
// reads all the data and fails on one that holds garbage, and a file kept
// as it is must not hold what qemu, and a VM, would fail to read.
func checkKept(ctx context.Context, path, source string, size int64) error {
	kept, err := openUntrusted(path)
	if err != nil {
		return err
	}
	defer kept.Close()
	if err := adoptable(kept, size); err != nil {
		return &ImportError{Msg: fmt.Sprintf("import: %s changed while it was imported (%v)", source, err), Err: qcow.ErrCorrupt}
	}
	return importRefusal(kept.(*qcow.Chain).CheckCompressed(ctx))
}

// restoredTime is a recorded creation time, or at when none was.
func restoredTime(t, at time.Time) time.Time {
	if t.IsZero() {
		return at
	}
	return t.UTC()
}

// restoredConsistency is a recorded consistency level, or None when none
// was: nothing is known of how the disk was taken.
func restoredConsistency(c Consistency) Consistency {
	if c == "" {
		return None
	}
	return c
}
