// Package fs shows the snapfs model (package snapshot) as a FUSE filesystem,
// with github.com/hanwen/go-fuse/v2. It only adapts: every decision about
// volumes, snapshots, chains and images is taken by the model; this package
// turns paths into model calls and model errors into errnos.
//
// # The tree
//
//	MOUNT/
//	  volumes/VOL/             ln -s ../V/snapshots/S volumes/NEW clones (volume_dir.go)
//	    info.json              the volume, its chain and snapshots (JSON)
//	    head.raw               the live head, flattened, read-only, never cached
//	    revert                 write-only: echo SNAP > revert (control_file.go)
//	    parent -> ../V/snapshots/S  a clone's parent (links.go); rm flattens
//	    snapshots/
//	      SNAP/                mkdir takes a snapshot, rmdir deletes it
//	        disk.raw           flattened raw export, sparse (SEEK_HOLE/SEEK_DATA)
//	        disk.qcow2         flattened qcow2 export, computed on read
//	        meta.json          the snapshot (snapshot.VolumeSnapshotMeta)
//	        parent -> ../PREV  the previous snapshot of the chain
//	        since/PREV.qcow2   what changed since PREV, an overlay (since_dir.go)
//	      latest -> SNAP       the newest snapshot
//	  instances/INST/
//	    info.json              the instance and its disks (JSON)
//	    revert                 write-only: echo SNAP > revert
//	    disks/vda -> ../../../volumes/VOL   (or a file's path, or a pool's volume)
//	    snapshots/SNAP/        mkdir snapshots every disk at one point
//	      meta.json            each disk's snapshot, the device mapping
//	      vda.raw vda.qcow2 ...
//	  import/                  cp IMAGE import/NAME: on close it becomes volumes/NAME;
//	                           cp -r of a snapshot folder restores it (import_dir.go)
//	  pools/POOL/              each mounted Ceph pool: volumes/, import/ (pools.go)
//
// # Errors
//
// Node methods return errnos made in one place, toErrno: the model's
// sentinels (snapshot.ErrNotFound, ErrExists, ErrBusy, ...) and qcow's
// refusals of a hostile image map to ENOENT, EEXIST, EBUSY, EINVAL, ENOTSUP,
// EROFS; anything unexpected becomes EIO with one log line. An import that
// fails is refused from close(2), where cp reports it; the log line says why.
//
// # Caching
//
// Snapshots never change: their attributes and entries are cached by the
// kernel (long timeouts); their exports are served with direct I/O and read
// ahead by snapfs for sequential readers (readahead.go, at most 48 MiB per
// process): copying into new page-cache pages cost more than it saved, and
// mmap with MAP_SHARED is refused (MAP_PRIVATE works). Inode numbers are
// derived from identity (backend, volume, snapshot and their creation
// times, file name), so they stay the same across remounts and a snapshot
// deleted and taken again under the same name never shows the old one's
// cached pages. The head, info.json and meta.json change and are served
// with direct I/O and no attribute caching. Directory entries whose
// existence can change outside the mount (volumes, snapshots) are cached
// for one second only.
//
// # Concurrency
//
// go-fuse runs requests in parallel. Nodes hold only their identity; the
// state they show is read from the model on each request, so nodes need no
// locks. The exceptions lock themselves and say so: the cached stat of an
// export (exportFile) and an import being written (importFile). Which
// snapshots have open files, so that rmdir of one gets EBUSY, is kept by
// the model (snapshot.Manager.Hold). Long mutations (snapshot delete,
// import) ignore interrupts from callers that live on (Go programs get
// SIGURG all the time) and stop only when the caller is dying or the
// filesystem is unmounted.
package fs
