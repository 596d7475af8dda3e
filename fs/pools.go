package fs

import (
	"context"
	"fmt"
	"strings"

	"snapfs/snapshot"
)

// Several backends in one mount (Config.Pools): the root shows one backend
// (Config.Backend: the local store, or the first pool) as volumes/ and
// import/, with instances/; every pool shows again under pools/POOL/, with
// its own volumes/ and import/:
//
//	volumes/  instances/  import/      Config.Backend
//	pools/POOL/volumes/  pools/POOL/import/
//
// Each tree is served by a filesystem of its own, whose backend the nodes
// below use; they share the mount's settings, its staging directory and
// its lifetime. A backend shown twice (the root's pool, again under
// pools/) shares its Manager between the two trees, so that a file open in
// one holds the snapshot against an rmdir in the other. The clone gesture
// in one tree may name a snapshot of another: it finds that tree from the
// mount's root, as a lookup would (volumesContents.cloneTree).

// poolsDir is the root's directory of the pools.
const poolsDir = "pools"

// crossCloner is a backend that clones snapshots of another backend of the
// mount into itself (rbdio.Pool: of another pool of its cluster), for the
// clone gesture across trees (volumesContents.symlink). It returns
// ErrUnsupported for a backend it cannot clone from.
type crossCloner interface {
	CloneFrom(ctx context.Context, src snapshot.Backend, volume, snapshot, newName string) (snapshot.Volume, error)
}

// Pool is a backend that a mount shows under pools/NAME/.
type Pool struct {
	// Name is the directory's name, the pool's name.
	Name    string
	Backend snapshot.Backend
}

// checkPools refuses pools a mount cannot show.
func checkPools(pools []Pool) error {
	seen := map[string]bool{}
	for _, p := range pools {
		if p.Name == "" || p.Name == "." || p.Name == ".." || strings.Contains(p.Name, "/") || seen[p.Name] {
			return fmt.Errorf("fs: pool name %q: empty, repeated, or not a file name", p.Name)
		}
		if p.Backend == nil {
			return fmt.Errorf("fs: pool %q has no backend", p.Name)
		}
		seen[p.Name] = true
	}
	return nil
}

// poolTree returns the filesystem of a tree of the mount of f that shows
// backend under at. Holds and cancellation are the mount's.
func (f *filesystem) poolTree(backend snapshot.Backend, at string) *filesystem {
	manager := f.manager
	if backend != f.backend {
		manager = snapshot.NewManager(backend, nil)
	}
	return &filesystem{
		backend:  backend,
		staging:  f.staging,
		readOnly: f.readOnly,
		uid:      f.uid,
		gid:      f.gid,
		umask:    f.umask,
		mounted:  f.mounted,
		log:      f.log,
		manager:  manager,
		spares:   f.spares,
		at:       at,
		ctx:      f.ctx,
		cancel:   f.cancel,
	}
}

// backendDirs returns volumes/ and import/ of f's backend, under id.
func (f *filesystem) backendDirs(id identity) (volumes, imports *dir) {
	contents := &volumesContents{fsys: f, id: id.child("volumes")}
	volumes = f.newDir("volumes", contents.id, contents, false, f.mounted, immutableTimeout)
	contents.dir = volumes
	imports = f.newDir("import", id.child("import"), &importContents{fsys: f, id: id.child("import")}, true, f.mounted, immutableTimeout)
	return volumes, imports
}

// newPoolsDir returns pools/: one directory per pool, in the order given.
func (f *filesystem) newPoolsDir(id identity, pools []Pool) *dir {
	var entries staticContents
	for _, p := range pools {
		t := f.poolTree(p.Backend, poolsDir+"/"+p.Name)
		pid := id.child(p.Name)
		volumes, imports := t.backendDirs(pid)
		entries = append(entries, t.newDir(p.Name, pid, staticContents{volumes, imports}, false, f.mounted, immutableTimeout))
	}
	return f.newDir(poolsDir, id, entries, false, f.mounted, immutableTimeout)
}
