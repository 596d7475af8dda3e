// Package rbdio is the Ceph RBD backend of snapfs: a [snapshot.Backend] over
// one RADOS pool, through github.com/ceph/go-ceph (librados and librbd).
//
// # Building
//
// The package needs cgo and the Ceph client libraries (Debian: librados-dev,
// librbd-dev), so it is behind the build tag "ceph": without it the package
// is this comment only, and qcow, snapshot and fs build and test with
// CGO_ENABLED=0. go-ceph itself needs a tag naming the Ceph release it
// compiles against when that is older than the newest it knows:
//
//	Ceph 16 (pacific, Debian 12)    go build -tags ceph,pacific
//	Ceph 17 (quincy)                go build -tags ceph,quincy
//	Ceph 18 (reef), 19 (squid)      go build -tags ceph
//
// Without "pacific" against Ceph 16 the build fails with "could not
// determine what C.rbd_encryption_load2 refers to".
//
// # Mapping
//
//   - A volume is an RBD image; a snapshot is an RBD snapshot (user
//     namespace). Images and snapshots whose names snapfs cannot show (a
//     leading '.', "latest", '@' in a volume name) are left out.
//   - What RBD does not keep (a snapshot's consistency level and user
//     metadata, a volume's user metadata) is kept in the image's metadata
//     (rbd image-meta), under keys that start with "snapfs.": see meta.go.
//   - A snapshot's parent is the previous snapshot of the image, by id.
//   - A clone is an RBD clone (format 2 when the cluster's
//     require_min_compat_client allows it, else format 1 from a protected
//     snapshot). Its [snapshot.Volume.Parent] names the parent image
//     bare when it is in the same pool and as "POOL/IMAGE" when it is not.
//
// # Reads
//
// [Pool.OpenSnapshot] and [Pool.OpenHead] return a [qcow.Image] that reads
// through librbd, splitting a large read into object-aligned pieces read
// concurrently. A snapshot's allocation map comes from diff-iterate on
// each image of its clone chain (whole objects), so every range is read
// from the image that owns it, without librbd walking the parents (at
// depth 8 that reads as fast as a flat image; librbd's own walk is 20-40%
// slower). A snapshot never changes, so a reader that goes forward in small
// reads is read ahead, in 4 MiB chunks, several at once (readahead.go);
// reads of 2 MiB and more come from a reader that reads ahead itself (the
// mount) and go straight to librbd. The parents' handles are opened once
// and shared (handles.go): librbd opens a clone's whole chain with it, so
// opening each parent again for every image would cost depth² opens.
//
// # Errors
//
// Errors wrap the sentinels of package snapshot (ErrNotFound, ErrExists,
// ErrBusy, ...). A cluster that does not answer within [Config.Timeout]
// gives an error wrapping [ErrTimeout] and syscall.ETIMEDOUT, never a hang:
// the timeout is set on the connection (rados_osd_op_timeout,
// rados_mon_op_timeout, client_mount_timeout).
//
// # Concurrency
//
// A [Pool] is safe for concurrent use. Mutations of one volume are
// serialised within the process; between processes RBD's own atomic
// operations (create, rename, snap create) decide. Reads take no lock.
package rbdio
