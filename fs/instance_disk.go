package fs

import (
	"context"
	"path"
	"strings"

	"snapfs/qcow"
)

// instanceDisk names disk device of snapshot snapshot of an instance. Its
// export files read it through snapshot.Manager.OpenInstanceDisk: the
// provider's own reader when it has one (a libvirt file disk's snapshot is
// a qcow2 layer that no backend knows), else the backend's snapshot.
type instanceDisk struct {
	instance, snapshot, device string
}

// openImage opens what the export file reads: the backend's snapshot
// e.ref, or the instance disk.
func (e *exportFile) openImage(ctx context.Context) (qcow.Image, error) {
	if e.disk == nil {
		return e.fsys.backend.OpenSnapshot(ctx, e.ref.Volume, e.ref.Snapshot)
	}
	return e.fsys.manager.OpenInstanceDisk(ctx, e.disk.instance, e.disk.snapshot, e.disk.device)
}

// hold holds what the export file reads while it is open, so that rmdir
// of its snapshot gets EBUSY.
func (e *exportFile) hold(ctx context.Context) (release func(), err error) {
	if e.disk == nil {
		return e.fsys.manager.Hold(ctx, e.ref.Volume, e.ref.Snapshot)
	}
	return e.fsys.manager.HoldInstanceDisk(ctx, e.disk.instance, e.disk.snapshot, e.disk.device)
}

// diskLink returns the target of instances/I/disks/DEV for a disk backed
// by volume, as the instance provider names it:
//
//   - a volume of the mount's backend ("VOL"): ../../../volumes/VOL;
//   - an RBD image ("rbd:POOL/IMAGE"): ../../../pools/POOL/volumes/IMAGE,
//     which dangles when the pool is not mounted (as links.go does for a
//     parent in a pool that is not mounted);
//   - a file that no backend holds (an absolute path, such as a libvirt
//     domain's qcow2 file): the path itself, outside the mount.
func diskLink(volume string) string {
	if strings.HasPrefix(volume, "/") {
		return volume
	}
	if image, ok := strings.CutPrefix(volume, "rbd:"); ok {
		return "../../../" + poolsDir + "/" + path.Join(path.Dir(image), "volumes", path.Base(image))
	}
	return "../../../volumes/" + volume
}
