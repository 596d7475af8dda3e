// Package virt is the libvirt instance provider of snapfs: libvirt domains
// as [snapshot.Instance]s, their disks, and consistent snapshots of every
// disk of a running domain, through libvirt.org/go/libvirt.
//
// # Building
//
// The package needs cgo and libvirt's client library (Debian: libvirt-dev),
// so it is behind the build tag "libvirt": without it the package holds only
// its pure-Go parts (domain XML, snapshot records), and qcow, snapshot and
// fs build and test with CGO_ENABLED=0.
//
//	CGO_ENABLED=1 go build -tags libvirt ./cmd/snapfs
//
// # Snapshots of a running domain
//
// [Provider.SnapshotDisks] takes one snapshot of every disk of a domain:
//
//  1. It freezes the guest filesystems through the QEMU guest agent
//     (virDomainFSFreeze), after setting the domain's agent response
//     timeout to Config.AgentTimeout so that a hung agent cannot hold the
//     call forever. A timer thaws the guest FreezeTimeout after the freeze
//     began, whatever the snapshot is doing.
//  2. It takes a libvirt external, disk-only snapshot of every file disk in
//     one atomic transaction (no libvirt metadata: the records are ours).
//     qemu carries on writing to new qcow2 overlays, which the provider
//     made before the freeze (REUSE_EXT: creating them inside the window
//     would double it); the files qemu wrote to until then become the
//     snapshot's read-only layers. RBD disks are snapshotted through the
//     snapshot.Backend of their pool. A disk that is a local-store
//     volume's head (Config.Store) gets its overlay from the store
//     ([snapshot.LocalStore.PrepareExternalHead]: a file of the store,
//     recorded as an intent), and once libvirt switched to it the store
//     commits the snapshot as the volume's own (the old head its layer,
//     the overlay its head); when libvirt fails, the store drops the
//     overlay and is as it was.
//  3. It asks the agent whether the filesystems are still frozen, then
//     thaws. The thaw is always attempted (on errors, timeouts and a
//     cancelled context too) and retried while the agent is away, for up to
//     Config.ThawTimeout.
//
// The snapshot records the consistency it really has:
//
//   - quiesced: the freeze succeeded and the agent still reported the
//     filesystems frozen after the disks were snapshotted (and the timer had
//     not thawed them);
//   - crash-consistent: no freeze (no agent, the agent failed, was killed
//     or restarted in the window, or the domain is paused or shut off), but
//     every disk was taken at one instant: in one atomic libvirt
//     transaction, or with the domain paused when the disks cannot be taken
//     in one transaction (RBD disks);
//   - none is never recorded by this package.
//
// With Config.RequireQuiesce (or SnapshotOptions.RequireQuiesce) a running
// domain whose guest cannot be frozen is refused, as Nova's
// os_require_quiesce does, instead of falling back.
//
// # Memory state
//
// A snapshot may also hold the domain's memory (a libvirt external
// checkpoint: the disks and the RAM at one instant, as `virsh save` writes
// it). It is chosen by SnapshotOptions.Memory or, through the generic
// [snapshot.InstanceProvider] methods (mkdir in the mount), by a snapshot
// name that ends in [MemorySuffix] ("+mem"). The guest is not frozen for a
// memory snapshot (the restored guest would wake up frozen); its disks are
// recorded as crash-consistent, and reverting it resumes the guest where it
// was.
//
// # Revert and delete
//
//   - [Provider.Revert] points a shut-off domain's disks at new, empty
//     overlays over the snapshot's layers (the snapshot stays as it is),
//     and, for a memory snapshot, restores the domain to running from the
//     saved memory.
//   - [Provider.DeleteInstanceSnapshot] merges a snapshot's layer with its
//     child layer. On a running domain that is libvirt block commit (qemu
//     does it, pivoting to the merged layer when the child is the active
//     one), so a disk is never changed under the running qemu; on a shut-off
//     domain it is qemu-img commit.
//   - A local-store volume's snapshot (see above) is the store's: on a
//     shut-off domain the store reverts (the domain then runs off the
//     volume's new head) and deletes it; on a running domain its delete is
//     refused with ErrBusy (and a log line): a block commit would change
//     the store's files behind its back.
//
// # In the mount
//
// `snapfs mount --libvirt URI` (cmd/snapfs/libvirt.go) shows the domains
// under instances/, next to the local store's instances
// ([snapshot.MergeInstances]: a store instance hides a domain of the same
// name). The Provider implements the optional interfaces of
// snapshot/instance_ext.go: mkdir instances/DOM/snapshots/S is
// [Provider.SnapshotInstance] (Manager does not freeze the guest a second
// time), vdX.raw and vdX.qcow2 read [Provider.OpenDiskSnapshot], meta.json
// carries the Record under "provider" ([Provider.DescribeInstanceSnapshot]),
// and `snapfs instance revert DOM S` and `echo S > instances/DOM/revert`
// are [Provider.Revert].
//
// # Records
//
// What libvirt does not keep is kept by the provider in Config.StateDir, one
// JSON file per domain (by UUID), written crash-safely: each snapshot's
// name, time, consistency, frozen window, the live domain XML at the time,
// the device mapping (device, layer file, overlay), the memory file.
//
// # Errors
//
// Errors wrap the sentinels of package snapshot (ErrNotFound for an unknown
// domain or snapshot, ErrExists, ErrBusy for a domain in the wrong state or
// a layer with several children, ErrUnsupported for a guest without an
// agent or a disk type that cannot be snapshotted), so that package fs maps
// them to errnos without importing libvirt. The libvirt error, when there
// is one, is wrapped too.
//
// # Concurrency
//
// A Provider is safe for concurrent use. The mutations of one domain
// (snapshot, delete, revert) are serialised, within the process by a mutex
// and across processes by a lock file next to its record.
package virt
