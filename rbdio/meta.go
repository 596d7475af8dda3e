//go:build ceph && cgo

package rbdio

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/ceph/go-ceph/rbd"

	"snapfs/snapshot"
)

// What RBD does not keep, snapfs keeps in the image's metadata (rbd
// image-meta, the omap of the image header), as JSON under these keys.
// Every record names the image id it was written for: rbd clone copies
// the parent's image-meta into the clone, which must not take the
// parent's records as its own.
const (
	// metaVolumeKey holds a volumeMeta.
	metaVolumeKey = "snapfs.volume"
	// metaSnapPrefix + snapshot id holds a snapMeta. Keyed by id, not
	// name: ids are never reused and survive rbd snap rename.
	metaSnapPrefix = "snapfs.snap."
	// metaRevertKey holds a revertMeta while a revert runs, so that one
	// interrupted is finished by the next access (see finishRevertLocked).
	metaRevertKey = "snapfs.revert"
)

// volumeMeta is the part of a volume RBD does not keep.
type volumeMeta struct {
	Image    string            `json:"image"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// snapMeta is the part of a snapshot RBD does not keep.
type snapMeta struct {
	Image       string               `json:"image"`
	Consistency snapshot.Consistency `json:"consistency"`
	// Method says how the snapshot was taken with the others of one
	// CreateSnapshots call: see the Method constants.
	Method   string            `json:"method,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// revertMeta records a revert in progress.
type revertMeta struct {
	Image    string `json:"image"`
	Snapshot string `json:"snapshot"`
	SnapID   uint64 `json:"snap_id"`
}

// How the snapshots of one CreateSnapshots call were taken, recorded in
// each snapshot's metadata, and shown as snapshot.Snapshot.Method.
const (
	// MethodSingle: one image, snapped by librbd, which quiesces the
	// image's writer (the exclusive lock owner) around the snapshot.
	MethodSingle = "single-image"
	// MethodIdle: several images, snapped one after the other while no
	// other client had any of them open: nothing could write between
	// the first and the last.
	MethodIdle = "idle"
	// MethodSequential: several images, snapped one after the other while
	// another client had some open. RBD cannot pause a writer it does
	// not control (group snapshots live in a namespace that cannot be
	// cloned or diffed by name in Ceph 16), so the set is consistent
	// only if the caller froze the guest first.
	MethodSequential = "sequential"
)

// Limits on user metadata: it lives in the image header's omap, which every
// open of the image reads.
const (
	maxMetaKeys     = 256
	maxMetaKeyLen   = 255
	maxMetaValueLen = 64 << 10
	maxMetaTotal    = 1 << 20
)

// checkMetadata refuses user metadata too large for an image header.
func checkMetadata(m map[string]string) error {
	if len(m) > maxMetaKeys {
		return fmt.Errorf("%w: %d metadata keys; at most %d", snapshot.ErrInvalid, len(m), maxMetaKeys)
	}
	total := 0
	for k, v := range m {
		if k == "" || len(k) > maxMetaKeyLen || !utf8.ValidString(k) {
			return fmt.Errorf("%w: metadata key %q: want 1 to %d bytes of UTF-8", snapshot.ErrInvalid, k, maxMetaKeyLen)
		}
		if len(v) > maxMetaValueLen || !utf8.ValidString(v) {
			return fmt.Errorf("%w: metadata value of %q: want at most %d bytes of UTF-8", snapshot.ErrInvalid, k, maxMetaValueLen)
		}
		total += len(k) + len(v)
	}
	if total > maxMetaTotal {
		return fmt.Errorf("%w: metadata is %d bytes; at most %d", snapshot.ErrInvalid, total, maxMetaTotal)
	}
	return nil
}

// imageMeta is the snapfs part of an image's metadata, as read.
type imageMeta struct {
	volume volumeMeta
	snaps  map[uint64]snapMeta
	revert *revertMeta
}

// readMeta reads the snapfs records of img (whose id is id), ignoring
// records written for another image (inherited by a clone) and records
// that do not parse (written by hand): they only carry what snapfs adds.
func readMeta(img *rbd.Image, id string) (imageMeta, error) {
	all, err := img.ListMetadata()
	if err != nil {
		return imageMeta{}, wrap("image-meta list "+img.GetName(), err)
	}
	m := imageMeta{snaps: map[uint64]snapMeta{}}
	for k, v := range all {
		switch {
		case k == metaVolumeKey:
			var vm volumeMeta
			if json.Unmarshal([]byte(v), &vm) == nil && vm.Image == id {
				m.volume = vm
			}
		case k == metaRevertKey:
			var rm revertMeta
			if json.Unmarshal([]byte(v), &rm) == nil && rm.Image == id {
				m.revert = &rm
			}
		case strings.HasPrefix(k, metaSnapPrefix):
			sid, err := strconv.ParseUint(k[len(metaSnapPrefix):], 10, 64)
			var sm snapMeta
			if err == nil && json.Unmarshal([]byte(v), &sm) == nil && sm.Image == id {
				m.snaps[sid] = sm
			}
		}
	}
	return m, nil
}

// setMeta writes one record as JSON.
func setMeta(img *rbd.Image, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		panic("BUG: metadata does not marshal: " + err.Error())
	}
	return wrap("image-meta set "+img.GetName()+" "+key, img.SetMetadata(key, string(b)))
}

// snapKey is the metadata key of snapshot id.
func snapKey(id uint64) string { return metaSnapPrefix + strconv.FormatUint(id, 10) }

// dropInherited removes from a new clone the snapfs records it copied from
// its parent, which describe the parent's snapshots, not its own.
func dropInherited(img *rbd.Image) error {
	all, err := img.ListMetadata()
	if err != nil {
		return wrap("image-meta list "+img.GetName(), err)
	}
	for k := range all {
		if strings.HasPrefix(k, "snapfs.") {
			if err := img.RemoveMetadata(k); err != nil {
				return wrap("image-meta remove "+img.GetName()+" "+k, err)
			}
		}
	}
	return nil
}

// copyMetadata returns a copy of m (nil for an empty map).
func copyMetadata(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
