//go:build ceph && cgo

package rbdio

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/ceph/go-ceph/rados"

	"snapfs/snapshot"
)

// Opening an RBD image opens its whole parent chain inside librbd, each
// parent a dozen round trips: asking an image of a clone chain 8 deep
// whether it has a snapshot costs more than the whole open of a flat
// image. Opening a snapshot's export asks exactly that (snapshot.Manager
// checks that the snapshot it holds exists), so SnapshotExists reads the
// answer from the image's RADOS objects instead, two reads and no open:
//
//   - rbd_id.IMAGE holds the image's id, an encoded string;
//   - rbd_header.ID holds one omap key per snapshot, "snapshot_" and the
//     id in 16 hex digits, whose value (cls_rbd_snap) begins with a
//     version header (struct_v, compat: a byte each; length: 4 bytes),
//     the snapshot id (8 bytes) and its name (an encoded string).
//
// These have been RBD's on-disk format (image format 2) since Ceph 0.61.
// Anything else (a format 1 image, a value that does not decode) falls
// back to listing the snapshots through librbd. The header also holds the
// snapshots of other namespaces (trash, group, mirror), which librbd does
// not list: they are named by a UUID or a '.'-prefixed name, which a
// snapshot name of snapfs matches only by a UUID's chance (a leading '.'
// fails snapshot.CheckSnapshotName), and the open that follows the check
// looks the snapshot up through librbd anyway.

// SnapshotExists returns nil if volume has a snapshot called name, and an
// error wrapping [snapshot.ErrNotFound] if not, without opening the image.
// It reads what is now in the cluster, nothing cached: it is as exact as
// Snapshot, and much cheaper for a clone.
func (p *Pool) SnapshotExists(ctx context.Context, volume, name string) error {
	if err := lookupName(volume); err != nil {
		return err
	}
	if snapshot.CheckSnapshotName(name) != nil {
		return fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, name, volume)
	}
	io, err := p.io()
	if err != nil {
		return err
	}
	found, err := snapshotInHeader(io, volume, name)
	if errors.Is(err, errUndecoded) {
		_, err = p.Snapshot(ctx, volume, name)
		return err
	}
	if errnoOf(err) == syscall.ENOENT {
		return fmt.Errorf("%w: volume %q (image %s)", snapshot.ErrNotFound, volume, p.spec(volume))
	}
	if err != nil {
		return wrap("snap ls "+p.spec(volume), err)
	}
	if !found {
		return fmt.Errorf("%w: snapshot %q of volume %q", snapshot.ErrNotFound, name, volume)
	}
	return nil
}

// errUndecoded says that an image's objects are not as snapshotInHeader
// reads them.
var errUndecoded = errors.New("rbd header not understood")

// snapshotInHeader says whether image has a snapshot called name, from
// its id object and header object.
func snapshotInHeader(io *rados.IOContext, image, name string) (bool, error) {
	buf := make([]byte, 4+256)
	n, err := io.Read("rbd_id."+image, buf, 0)
	if err != nil {
		return false, err
	}
	if n == 0 {
		// A format 1 image has no id object; or a race with a removal.
		return false, errUndecoded
	}
	id, _, ok := decodeString(buf[:n])
	if !ok || id == "" {
		return false, errUndecoded
	}
	values, err := io.GetAllOmapValues("rbd_header."+id, "", "snapshot_", 256)
	if err != nil {
		return false, err
	}
	for key, v := range values {
		snapName, ok := snapNameOf(v)
		if !ok {
			return false, fmt.Errorf("%w: %s of rbd_header.%s", errUndecoded, key, id)
		}
		if snapName == name {
			return true, nil
		}
	}
	return false, nil
}

// snapNameOf decodes the name of a cls_rbd_snap value.
func snapNameOf(v []byte) (string, bool) {
	const header = 1 + 1 + 4 // struct_v, compat, length
	if len(v) < header+8 {
		return "", false
	}
	name, _, ok := decodeString(v[header+8:])
	return name, ok
}

// decodeString decodes a Ceph-encoded string (a 32-bit little-endian
// length, then the bytes) at the start of b, and returns the rest.
func decodeString(b []byte) (string, []byte, bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := binary.LittleEndian.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}
