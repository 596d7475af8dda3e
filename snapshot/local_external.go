package snapshot

// External heads: a snapshot of a volume whose head a running qemu writes
// to, taken by qemu itself (a libvirt external disk-only snapshot), with
// the store keeping the truth.
//
// The store cannot switch qemu to a new head, and qemu (libvirt) must not
// pick the new head's name, or the store would lose track of the file that
// receives the writes. So the switch is split in three:
//
//  1. PrepareExternalHead locks the volume, writes an intent
//     (STORE/external/VOLUME.json: the old head, the new head, the
//     snapshot name) and then the new head, an empty qcow2 overlay on top
//     of the current head, in layers/ under a fresh layer name;
//  2. the caller has qemu switch to that file (libvirt, REUSE_EXT);
//  3. Commit turns the old head into the snapshot's read-only layer and
//     the prepared file into the head, in one metadata commit, then drops
//     the intent; Abort (qemu never switched) removes the file and the
//     intent.
//
// After a crash between 1 and 3, resolveExternal (OpenLocal, and settle
// before the next mutation of the volume) decides from what is on disk: a
// prepared file that qemu has open, or that has grown since it was made
// (something wrote to it), is qemu's head, and the snapshot is committed
// (consistency none: whether the freeze held is not known); any other is
// removed with the intent, and the store is as it was.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"snapfs/qcow"
)

// externalDir holds the intents of external head switches under way.
const externalDir = "external"

// externalIntent is STORE/external/VOLUME.json.
type externalIntent struct {
	Volume   string            `json:"volume"`
	Snapshot string            `json:"snapshot"`
	OldHead  string            `json:"old_head"`
	NewHead  string            `json:"new_head"`
	Size     int64             `json:"size"` // of NewHead once written: a bigger file has been written to
	Metadata map[string]string `json:"metadata,omitempty"`
}

// ExternalHead is a new head of a local-store volume prepared for qemu to
// switch to (see PrepareExternalHead). It holds the volume's lock until
// Commit or Abort.
type ExternalHead struct {
	// Volume is the volume, OldPath the file of its current head (the
	// snapshot's layer once committed), Path the prepared new head.
	Volume, OldPath, Path string

	s       *LocalStore
	intent  externalIntent
	nf      *newFile // keeps the prepared file's sweep lock
	release func()   // the volume lock
	done    bool
}

func (s *LocalStore) intentPath(volume string) string {
	return filepath.Join(s.dir, externalDir, volume+".json")
}

// PrepareExternalHead prepares snapshot name of the volume whose head file
// is headPath, for a snapshot that qemu takes (a libvirt external
// snapshot): the returned ExternalHead's Path is a new, empty qcow2
// overlay on top of the head, which qemu must switch to; then call Commit,
// or Abort if qemu did not switch. ErrNotFound when headPath is no
// volume's head; ErrExists when the volume has a snapshot of that name.
func (s *LocalStore) PrepareExternalHead(ctx context.Context, headPath, name string, opts SnapshotOptions) (h *ExternalHead, err error) {
	if err := CheckNewSnapshotName(name); err != nil {
		return nil, err
	}
	if err := checkMetadata(opts.Metadata); err != nil {
		return nil, err
	}
	volume, err := s.volumeOfHead(headPath)
	if err != nil {
		return nil, err
	}
	release, err := s.lockVolumes(ctx, volume)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	if err := s.settle(ctx, volume); err != nil {
		return nil, err
	}
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	v, err := m.volume(volume)
	if err != nil {
		return nil, err
	}
	if filepath.Clean(headPath) != s.layerPath(v.Head) {
		return nil, fmt.Errorf("%w: %s is no longer the head of volume %q", ErrBusy, headPath, volume)
	}
	if v.findSnapshot(name) >= 0 {
		return nil, fmt.Errorf("%w: snapshot %q of volume %q", ErrExists, name, volume)
	}
	if depth := 2 + len(m.chainBelow(v, len(v.Layers)-1)); depth > qcow.DefaultMaxDepth {
		return nil, fmt.Errorf("%w: volume %q would have %d layers, more than the %d a chain may have; delete a snapshot first",
			ErrUnsupported, volume, depth, qcow.DefaultMaxDepth)
	}

	nf, err := s.createFile(newLayerName(), true)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			nf.discard()
		}
	}()
	if err := qcow.CreateOverlay(nf.f, v.Size, 0, v.Head, "qcow2"); err != nil {
		return nil, fmt.Errorf("volume %q: new head: %w", volume, err)
	}
	st, err := nf.f.Stat()
	if err != nil {
		return nil, err
	}
	in := externalIntent{Volume: volume, Snapshot: name, OldHead: v.Head, NewHead: filepath.Base(nf.final),
		Size: st.Size(), Metadata: copyMetadata(opts.Metadata)}
	// The intent first: a file it names may be qemu's after a crash, a
	// file it does not name is an orphan for the sweep.
	if err := s.writeIntent(in); err != nil {
		return nil, err
	}
	if err := nf.publish(layerMode(true)); err != nil {
		s.dropIntent(volume)
		return nil, err
	}
	if err := s.syncLayers(); err != nil {
		s.dropIntent(volume)
		return nil, err
	}
	return &ExternalHead{Volume: volume, OldPath: s.layerPath(v.Head), Path: nf.final,
		s: s, intent: in, nf: nf, release: release}, nil
}

// volumeOfHead returns the volume whose head file is path.
func (s *LocalStore) volumeOfHead(path string) (string, error) {
	m, err := s.load()
	if err != nil {
		return "", err
	}
	for name, v := range m.Volumes {
		if s.layerPath(v.Head) == filepath.Clean(path) {
			return name, nil
		}
	}
	return "", fmt.Errorf("%w: %s is the head of no volume of the store", ErrNotFound, path)
}

// Commit records the switch qemu made: the old head becomes snapshot
// layer of the volume, with consistency c, and the prepared file its head,
// in one metadata commit. On error the intent stays (qemu writes to the
// prepared file): the next OpenLocal, or mutation of the volume, commits
// it.
func (h *ExternalHead) Commit(ctx context.Context, c Consistency) error {
	if h.done {
		return fmt.Errorf("%w: external head of volume %q already committed or aborted", ErrInvalid, h.Volume)
	}
	h.done = true
	defer h.release()
	defer h.nf.release()
	if err := c.check(); err != nil {
		return err
	}
	return h.s.commitExternal(context.WithoutCancel(ctx), h.intent, c)
}

// Abort removes the prepared file (qemu did not switch to it): the store
// is as it was.
func (h *ExternalHead) Abort() {
	if h.done {
		return
	}
	h.done = true
	defer h.release()
	h.nf.discard()
	h.s.dropIntent(h.Volume)
}

// commitExternal makes the switch of intent in the metadata and drops the
// intent.
func (s *LocalStore) commitExternal(ctx context.Context, in externalIntent, c Consistency) error {
	created := now()
	err := s.commit(ctx, func(m *storeMeta) error {
		v, err := m.volume(in.Volume)
		if err != nil {
			return err
		}
		if v.Head != in.OldHead {
			return fmt.Errorf("%w: the head of volume %q changed during the external snapshot %q", ErrBusy, in.Volume, in.Snapshot)
		}
		if v.findSnapshot(in.Snapshot) >= 0 {
			return fmt.Errorf("%w: snapshot %q of volume %q", ErrExists, in.Snapshot, in.Volume)
		}
		v.Layers = append(v.Layers, layerMeta{File: v.Head, Snapshot: &snapshotMeta{
			Name: in.Snapshot, Created: created, Consistency: c, Metadata: copyMetadata(in.Metadata),
		}})
		v.Head = in.NewHead
		return nil
	})
	if err != nil {
		return fmt.Errorf("volume %q: snapshot %q: %w", in.Volume, in.Snapshot, err)
	}
	s.dropIntent(in.Volume)
	// Read-only from now on, as CreateSnapshots does (qemu keeps its open
	// file descriptor).
	os.Chmod(s.layerPath(in.OldHead), layerMode(false))
	return nil
}

// writeIntent writes the intent of a volume, durably.
func (s *LocalStore) writeIntent(in externalIntent) error {
	dir := filepath.Join(s.dir, externalDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.intentPath(in.Volume), data); err != nil {
		return err
	}
	return syncDir(dir)
}

// dropIntent removes the intent of a volume.
func (s *LocalStore) dropIntent(volume string) {
	if err := os.Remove(s.intentPath(volume)); err == nil {
		syncDir(filepath.Join(s.dir, externalDir))
	}
}

// intentHeads returns the prepared heads the intents name: the sweep
// leaves them alone (qemu may write to one whose switch was cut short).
func (s *LocalStore) intentHeads() []string {
	entries, _ := os.ReadDir(filepath.Join(s.dir, externalDir))
	var out []string
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(s.dir, externalDir, e.Name()))
		var in externalIntent
		if err == nil && json.Unmarshal(data, &in) == nil {
			out = append(out, in.NewHead)
		}
	}
	return out
}

// resolveExternalAll resolves the intents a crash left, on the volumes
// no live process holds (OpenLocal).
func (s *LocalStore) resolveExternalAll(ctx context.Context) error {
	entries, err := os.ReadDir(filepath.Join(s.dir, externalDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		volume, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || CheckVolumeName(volume) != nil {
			continue
		}
		release, ok, err := s.tryLockVolume(volume)
		if err != nil {
			return err
		}
		if !ok {
			continue // a live process is switching it
		}
		err = s.resolveExternal(ctx, volume)
		release()
		if err != nil {
			return err
		}
	}
	return nil
}

// resolveExternal settles the intent of volume, if any, under its lock:
// commit it when qemu has switched to the prepared file, else remove the
// file and the intent.
func (s *LocalStore) resolveExternal(ctx context.Context, volume string) error {
	data, err := os.ReadFile(s.intentPath(volume))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var in externalIntent
	if err := json.Unmarshal(data, &in); err != nil || in.Volume != volume || !layerFileRe.MatchString(in.NewHead) ||
		CheckSnapshotName(in.Snapshot) != nil {
		return fmt.Errorf("external snapshot intent %s: unreadable or not the store's (%v); remove it by hand once the VM using volume %q is known to be sound",
			s.intentPath(volume), err, volume)
	}
	path := s.layerPath(in.NewHead)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		s.dropIntent(volume) // never published
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	// Keep the sweep of other processes off the file while deciding.
	if err := tryLock(f, syscall.F_WRLCK, sweepLockOff, 1); err != nil {
		return fmt.Errorf("%w: external snapshot of volume %q: %s is locked by a live process", ErrBusy, volume, path)
	}
	inUse, err := openByQemu(path)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	m, err := s.load()
	if err != nil {
		return err
	}
	v, err := m.volume(volume)
	switch {
	case err == nil && v.Head == in.NewHead:
		s.dropIntent(volume) // committed, then the crash
		return nil
	case err != nil || v.Head != in.OldHead:
		// Stale: the volume went or moved on. A file qemu still has
		// open stays, named by the intent, out of the sweep's reach.
		if !inUse {
			os.Remove(path)
			s.dropIntent(volume)
		}
		return nil
	}
	if inUse || st.Size() != in.Size {
		if err := s.commitExternal(ctx, in, None); err != nil {
			return fmt.Errorf("external snapshot of volume %q, interrupted: qemu writes to %s: %w", volume, path, err)
		}
		return nil
	}
	os.Remove(path)
	s.dropIntent(volume)
	return nil
}
