package snapshot

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// The local store's metadata is one JSON document, store.json, replaced
// whole on every change (write a temp file, fsync, rename, fsync the
// directory). One file makes a change that spans volumes (an instance
// snapshot) atomic for free; a store holds at most thousands of snapshots,
// so rewriting it costs well under a millisecond of encoding.
//
// A loaded storeMeta is never modified: commit clones it, changes the clone
// and swaps it in, so readers need no lock once they hold a pointer.

const metaVersion = 1

// storeMeta is store.json.
type storeMeta struct {
	Version int `json:"version"`
	// Generation counts commits, for debugging and change detection.
	Generation uint64                   `json:"generation"`
	Volumes    map[string]*volumeMeta   `json:"volumes"`
	Instances  map[string]*instanceMeta `json:"instances"`
}

// volumeMeta is one volume: its layers bottom up, then its head.
type volumeMeta struct {
	Created time.Time `json:"created"`
	Size    int64     `json:"size"`
	// Parent is the snapshot a clone reads through below its own layers.
	Parent *SnapshotRef `json:"parent,omitempty"`
	// Layers are the read-only layers, oldest (bottom) first. Each is a
	// file in layers/ whose backing file is the layer below it (or, for
	// the bottom one, the parent snapshot's layer or nothing).
	Layers []layerMeta `json:"layers"`
	// Head is the writable overlay on top of the last layer.
	Head     string            `json:"head"`
	Metadata map[string]string `json:"metadata,omitempty"`
	// Merging names the snapshot being deleted, while its child may
	// already skip its layer (see deleteSnapshot).
	Merging string `json:"merging,omitempty"`
	// Flatten is set while the clone is being flattened: the progress,
	// and the mark that a crash may have left the bottom layer already
	// flattened (see Flatten).
	Flatten *Progress `json:"flatten,omitempty"`
}

// layerMeta is one read-only layer. Most layers are snapshots; an
// imported volume's base layer is not (it has no name).
type layerMeta struct {
	File     string        `json:"file"`
	Snapshot *snapshotMeta `json:"snapshot,omitempty"`
}

// snapshotMeta is what the store keeps about a snapshot.
type snapshotMeta struct {
	Name        string            `json:"name"`
	Created     time.Time         `json:"created"`
	Consistency Consistency       `json:"consistency"`
	Metadata    map[string]string `json:"metadata,omitempty"`
	// Instance is set when the snapshot belongs to an instance snapshot.
	Instance string `json:"instance,omitempty"`
}

// instanceMeta is one instance: a named group of volumes.
type instanceMeta struct {
	Created   time.Time              `json:"created"`
	Disks     []Disk                 `json:"disks"`
	Snapshots []instanceSnapshotMeta `json:"snapshots,omitempty"`
}

// instanceSnapshotMeta records one instance snapshot.
type instanceSnapshotMeta struct {
	Name        string            `json:"name"`
	Created     time.Time         `json:"created"`
	Consistency Consistency       `json:"consistency"`
	Disks       []SnapshotDisk    `json:"disks"`
	Frozen      time.Duration     `json:"frozen_ns,omitempty"`
	Metadata    map[string]string `json:"metadata,omitempty"`
	// Deleting marks a record whose disk snapshots are being deleted: it
	// is hidden, and OpenLocal finishes the job after a crash.
	Deleting bool `json:"deleting,omitempty"`
}

func newStoreMeta() *storeMeta {
	return &storeMeta{Version: metaVersion, Volumes: map[string]*volumeMeta{}, Instances: map[string]*instanceMeta{}}
}

// clone returns a deep copy, through JSON: every field is plain data.
func (m *storeMeta) clone() *storeMeta {
	data, err := json.Marshal(m)
	if err != nil {
		panic("BUG: store metadata does not marshal: " + err.Error())
	}
	c := newStoreMeta()
	if err := json.Unmarshal(data, c); err != nil {
		panic("BUG: store metadata does not round-trip: " + err.Error())
	}
	if c.Volumes == nil {
		c.Volumes = map[string]*volumeMeta{}
	}
	if c.Instances == nil {
		c.Instances = map[string]*instanceMeta{}
	}
	return c
}

// layerFileRe is the shape of every layer file name: a random identity, so
// that names are never reused and never come from user input.
var layerFileRe = regexp.MustCompile(`^[0-9a-f]{16}\.qcow2$`)

// newLayerName returns a fresh layer file name.
func newLayerName() string { return randomHex() + ".qcow2" }

func randomHex() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("BUG: crypto/rand failed: " + err.Error())
	}
	return hex.EncodeToString(b[:])
}

// validate checks what the rest of the store relies on: file names that
// stay inside layers/, no file used twice, known names. store.json is the
// store's own file, but a hand edit must give an error, not a path escape.
func (m *storeMeta) validate() error {
	if m.Version != metaVersion {
		return fmt.Errorf("version %d, this snapfs reads version %d", m.Version, metaVersion)
	}
	files := map[string]string{}
	use := func(file, who string) error {
		if !layerFileRe.MatchString(file) {
			return fmt.Errorf("%s: bad layer file name %q", who, file)
		}
		if other, ok := files[file]; ok {
			return fmt.Errorf("%s: layer %q is also used by %s", who, file, other)
		}
		files[file] = who
		return nil
	}
	for name, v := range m.Volumes {
		if v == nil {
			return fmt.Errorf("volume %q: null", name)
		}
		if err := CheckVolumeName(name); err != nil {
			return err
		}
		if v.Size <= 0 {
			return fmt.Errorf("volume %q: size %d", name, v.Size)
		}
		snaps := map[string]bool{}
		for _, l := range v.Layers {
			if err := use(l.File, "volume "+name); err != nil {
				return err
			}
			if s := l.Snapshot; s != nil {
				if err := CheckSnapshotName(s.Name); err != nil {
					return fmt.Errorf("volume %q: %w", name, err)
				}
				if snaps[s.Name] {
					return fmt.Errorf("volume %q: snapshot %q twice", name, s.Name)
				}
				snaps[s.Name] = true
			}
		}
		if err := use(v.Head, "volume "+name); err != nil {
			return err
		}
	}
	for name, in := range m.Instances {
		if in == nil {
			return fmt.Errorf("instance %q: null", name)
		}
		if err := CheckInstanceName(name); err != nil {
			return err
		}
	}
	return nil
}

// findSnapshot returns the index in v.Layers of snapshot name, or -1.
func (v *volumeMeta) findSnapshot(name string) int {
	for i, l := range v.Layers {
		if l.Snapshot != nil && l.Snapshot.Name == name {
			return i
		}
	}
	return -1
}

// metaFile and lockFile live in the store directory, layer files in
// layers/ below it.
const (
	metaFile   = "store.json"
	lockFile   = "lock"
	layersDir  = "layers"
	tempPrefix = ".tmp-"
)

// readMeta reads store.json; a missing file is an empty store.
func readMeta(path string) (*storeMeta, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return newStoreMeta(), nil
	}
	if err != nil {
		return nil, err
	}
	m := newStoreMeta()
	if err := json.Unmarshal(data, m); err != nil {
		return nil, fmt.Errorf("snapshot: %s: %w", path, err)
	}
	if m.Volumes == nil {
		m.Volumes = map[string]*volumeMeta{}
	}
	if m.Instances == nil {
		m.Instances = map[string]*instanceMeta{}
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("snapshot: %s: %w", path, err)
	}
	return m, nil
}

// writeFileAtomic replaces path with data crash-safely: a temp file in the
// same directory, fsync, rename over path, fsync of the directory. After a
// crash path holds the old or the new content, never a mix; the temp file
// may be left behind (the startup sweep removes it).
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp := filepath.Join(dir, tempPrefix+randomHex())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(dir)
}

// syncDir makes the entries of dir (creations, renames, removals) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// maxMetadataBytes bounds the user metadata of one volume or snapshot:
// it is copied into store.json and into every meta.json of the mount.
const maxMetadataBytes = 64 << 10

// checkMetadata refuses user metadata that is too big or has empty keys.
func checkMetadata(meta map[string]string) error {
	n := 0
	for k, v := range meta {
		if k == "" {
			return fmt.Errorf("%w: metadata with an empty key", ErrInvalid)
		}
		n += len(k) + len(v)
	}
	if n > maxMetadataBytes {
		return fmt.Errorf("%w: metadata is %d bytes; at most %d", ErrInvalid, n, maxMetadataBytes)
	}
	return nil
}

// copyMetadata returns a copy of meta, nil when empty.
func copyMetadata(meta map[string]string) map[string]string {
	if len(meta) == 0 {
		return nil
	}
	c := make(map[string]string, len(meta))
	for k, v := range meta {
		c[k] = v
	}
	return c
}

// now is the creation time of new things: UTC, without the monotonic
// reading, to the microsecond (what survives every JSON and FUSE round trip
// and prints short).
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// jsonIndent renders store.json: indented, so that a human can read it,
// with a final newline.
func jsonIndent(m *storeMeta) ([]byte, error) {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}
