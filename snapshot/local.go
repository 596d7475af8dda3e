package snapshot

// The local store: volumes as chains of qcow2 files in one directory.
//
// # Layout
//
//	STORE/              mode 0700
//	  store.json        all metadata (see local_meta.go)
//	  lock              byte-range locks between processes sharing the store
//	  layers/
//	    0123456789abcdef.qcow2   one file per layer, named by a random id
//
// Every layer lives in the same directory and names its backing file by bare
// file name, so qemu-img opens any of them, the store can be moved, and a
// clone's layer can sit on another volume's snapshot with no "..".
//
// # Crash safety
//
// Files are written under a temp name (".tmp-ID"), fsynced and renamed into
// place before the metadata that refers to them is committed; files are
// removed only after the metadata that referred to them is committed. A
// layer is only ever replaced (never modified) by renaming a new file over
// it, and only by one that reads exactly as the old one did (the merge of
// a snapshot delete, and the standalone bottom layer of a flatten, which
// both commit their intent first: see deleteSnapshot and Flatten). So
// after a kill -9 at any point the metadata refers only to complete files
// that read as it says, and the worst left over is a file nobody refers
// to, which the sweep in OpenLocal removes; OpenLocal also finishes what a
// crash interrupted once it could no longer be undone (a merged child or a
// flattened bottom layer in place, an instance snapshot delete under way),
// except on volumes another live process is working on (it settles them).
//
// # Lock order
//
//  1. volume locks (lockVolumes), ascending by key;
//  2. metaMu, then the metadata byte of the lock file (commit, sweep);
//  3. mu (the cached metadata pointer) and keysMu, held for nanoseconds.
//
// A volume lock is an in-process mutex plus an OFD lock on one byte of the
// lock file (at an offset hashed from the volume name), so that two
// processes (a mount and a CLI command) never mutate one volume at once.
// Readers take no lock: they read the current metadata (a pointer, or
// store.json again if another process replaced it) and open files, and
// retry when a file vanished under them because a commit removed it.

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"snapfs/qcow"
)

// MaxVolumeSize is the largest virtual size the local store creates or
// imports, a sanity bound against hostile headers: 64 TiB.
const MaxVolumeSize = 64 << 40

// DefaultStoreDir returns the store directory used when --store is not
// given: /var/lib/snapfs for root, $XDG_DATA_HOME/snapfs (or
// ~/.local/share/snapfs) for anyone else.
func DefaultStoreDir() string {
	home, _ := os.UserHomeDir()
	return storeDirFor(os.Geteuid(), os.Getenv("XDG_DATA_HOME"), home)
}

// storeDirFor is DefaultStoreDir for a given user and environment. A
// relative XDG_DATA_HOME is ignored, as the XDG spec says.
func storeDirFor(euid int, xdgDataHome, home string) string {
	switch {
	case euid == 0:
		return "/var/lib/snapfs"
	case xdgDataHome != "" && filepath.IsAbs(xdgDataHome):
		return filepath.Join(xdgDataHome, "snapfs")
	case home == "":
		// No home: a relative directory is better than a shared one.
		return filepath.Join(".local", "share", "snapfs")
	}
	return filepath.Join(home, ".local", "share", "snapfs")
}

// LocalStore is the embedded backend: volumes as chains of qcow2 files in
// a directory, plus instances as named groups of its volumes. It
// implements [Backend] and [InstanceProvider]. It is safe for concurrent
// use, and several processes may open the same directory at once.
type LocalStore struct {
	dir    string
	layers string // dir/layers
	lock   *os.File
	cache  *qcow.Cache

	metaMu sync.Mutex // serialises commits within the process

	mu     sync.Mutex // protects the fields below
	meta   *storeMeta // the last metadata read or written; never modified
	metaID fileID     // which version of store.json meta came from

	keysMu sync.Mutex // protects keys
	keys   map[int64]*keyLock
}

// keyLock is the in-process half of a volume lock. A channel rather than a
// sync.Mutex so that a waiter can give up when its context is done.
type keyLock struct {
	ch   chan struct{}
	refs int // holders and waiters; the entry goes when it drops to 0
}

// Offsets in the lock file. Byte 0 guards store.json; volume keys are
// hashed above volumeKeyBase; sweepLockOff is where a file being written
// is locked, far past the bytes qemu locks in images (100-299).
const (
	metaLockOff   = 0
	volumeKeyBase = 1 << 12
	sweepLockOff  = 1 << 40
)

// OpenLocal opens the store in dir, creating it (mode 0700) if needed. It
// removes what a crash left behind (temp files, layers that no metadata
// refers to) and finishes instance snapshot deletions that a crash cut
// short.
func OpenLocal(dir string) (*LocalStore, error) {
	return OpenLocalContext(context.Background(), dir)
}

// OpenLocalContext is OpenLocal with a context for the recovery it may run.
func OpenLocalContext(ctx context.Context, dir string) (*LocalStore, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	s := &LocalStore{
		dir:    abs,
		layers: filepath.Join(abs, layersDir),
		cache:  qcow.NewCache(qcow.DefaultCacheBytes),
		keys:   map[int64]*keyLock{},
	}
	if err := os.MkdirAll(s.layers, 0o700); err != nil {
		return nil, fmt.Errorf("snapshot: store %s: %w", abs, err)
	}
	s.lock, err = os.OpenFile(filepath.Join(abs, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("snapshot: store %s: %w", abs, err)
	}
	if err := s.recoverStore(ctx); err != nil {
		s.lock.Close()
		return nil, fmt.Errorf("snapshot: store %s: %w", abs, err)
	}
	return s, nil
}

// Close releases the store. Images opened from it stay readable.
func (s *LocalStore) Close() error { return s.lock.Close() }

// Name implements [Backend].
func (s *LocalStore) Name() string { return "local" }

// Dir returns the store directory.
func (s *LocalStore) Dir() string { return s.dir }

func (s *LocalStore) metaPath() string             { return filepath.Join(s.dir, metaFile) }
func (s *LocalStore) layerPath(file string) string { return filepath.Join(s.layers, file) }

// recoverStore writes an empty store.json into a new store, resolves
// interrupted external head switches (resolveExternalAll), sweeps what
// crashes left, settles interrupted snapshot deletes and flattens (settle)
// and resumes interrupted instance snapshot deletions.
func (s *LocalStore) recoverStore(ctx context.Context) error {
	// Before the sweep: a prepared head qemu may write to is no orphan.
	if err := s.resolveExternalAll(ctx); err != nil {
		return err
	}
	var pending []InstanceSnapshot
	var unsettled []string
	err := s.withMetaLock(ctx, func() error {
		m, err := s.load()
		if err != nil {
			return err
		}
		if _, err := os.Stat(s.metaPath()); errors.Is(err, fs.ErrNotExist) {
			if err := s.write(m); err != nil {
				return err
			}
		}
		if err := s.sweep(m); err != nil {
			return err
		}
		for name, v := range m.Volumes {
			if v.Merging != "" || v.Flatten != nil {
				unsettled = append(unsettled, name)
			}
		}
		for inName, in := range m.Instances {
			for _, rec := range in.Snapshots {
				if rec.Deleting {
					pending = append(pending, InstanceSnapshot{Instance: inName, Name: rec.Name})
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, vol := range unsettled {
		// A volume whose lock is held is being worked on by a live
		// process (a flatten or a merge in the mount): it settles the
		// volume itself, and waiting for it here would hang every
		// command for as long as its copy takes.
		release, ok, err := s.tryLockVolume(vol)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		err = s.settle(ctx, vol)
		release()
		if err != nil {
			return err
		}
	}
	for _, p := range pending {
		// Best effort: a disk that cannot be merged now (its head is open
		// in qemu) must not keep the store from opening. The record stays
		// marked, hidden, and the next open or delete tries again.
		s.finishInstanceSnapshotDelete(ctx, p.Instance, p.Name)
	}
	return nil
}

// sweep removes temp files and layer files that m does not refer to,
// except those another process is still writing (they are locked). It runs
// under the metadata lock, so no commit can make a file referenced while
// it looks.
func (s *LocalStore) sweep(m *storeMeta) error {
	used := map[string]bool{}
	for _, f := range s.intentHeads() {
		used[f] = true
	}
	for _, v := range m.Volumes {
		used[v.Head] = true
		for _, l := range v.Layers {
			used[l.File] = true
		}
	}
	// Temp files of store.json are written under the metadata lock, which
	// we hold: any that exist are orphans.
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			os.Remove(filepath.Join(s.dir, e.Name()))
		}
	}
	entries, err = os.ReadDir(s.layers)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if used[name] || !(strings.HasPrefix(name, tempPrefix) || layerFileRe.MatchString(name)) {
			continue // in use, or not ours to remove
		}
		s.removeIfUnlocked(s.layerPath(name))
	}
	return nil
}

// removeIfUnlocked removes path unless another open file holds its sweep
// lock (a writer that has not committed yet).
func (s *LocalStore) removeIfUnlocked(path string) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return
	}
	defer f.Close()
	if tryLock(f, syscall.F_WRLCK, sweepLockOff, 1) == nil {
		os.Remove(path)
	}
}

// withMetaLock runs fn holding the metadata lock of this process and of
// every other process on the store.
func (s *LocalStore) withMetaLock(ctx context.Context, fn func() error) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	if err := lockWait(ctx, s.lock, syscall.F_WRLCK, metaLockOff, 1); err != nil {
		return err
	}
	defer unlock(s.lock, metaLockOff, 1)
	return fn()
}

// load returns the current metadata: the cached copy while store.json is
// the version it came from, else store.json read again (another process
// committed).
func (s *LocalStore) load() (*storeMeta, error) {
	id, err := statID(s.metaPath())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	s.mu.Lock()
	m, cached := s.meta, s.metaID
	s.mu.Unlock()
	if m != nil && id == cached {
		return m, nil
	}
	// Stat first, read second: the content is at least as new as id, so
	// a racing commit makes the next load read again, never miss it.
	m, err = readMeta(s.metaPath())
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.meta, s.metaID = m, id
	s.mu.Unlock()
	return m, nil
}

// write replaces store.json with m (under the metadata lock) and caches m.
func (s *LocalStore) write(m *storeMeta) error {
	data, err := jsonIndent(m)
	if err != nil {
		return err
	}
	err = writeFileAtomic(s.metaPath(), data)
	id, serr := statID(s.metaPath())
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil || serr != nil {
		// The rename may or may not have happened: read it back next time.
		s.meta, s.metaID = nil, fileID{}
		return errors.Join(err, serr)
	}
	s.meta, s.metaID = m, id
	return nil
}

// commit applies change to a copy of the freshest metadata and writes it,
// under the metadata lock. change sees the metadata as it is now, whatever
// another process did meanwhile, and returns an error to commit nothing.
func (s *LocalStore) commit(ctx context.Context, change func(m *storeMeta) error) error {
	return s.withMetaLock(ctx, func() error {
		cur, err := s.load()
		if err != nil {
			return err
		}
		m := cur.clone()
		if err := change(m); err != nil {
			return err
		}
		m.Generation++
		return s.write(m)
	})
}

// lockVolumes takes the locks of the named volumes (which need not exist),
// in key order, and returns the function that releases them.
func (s *LocalStore) lockVolumes(ctx context.Context, names ...string) (release func(), err error) {
	var keys []int64
	for _, n := range names {
		keys = append(keys, volumeKey(n))
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)
	var held []int64
	release = func() {
		for i := len(held) - 1; i >= 0; i-- {
			unlock(s.lock, held[i], 1)
			s.unlockKey(held[i])
		}
	}
	for _, k := range keys {
		if err := s.lockKey(ctx, k); err != nil {
			release()
			return nil, err
		}
		if err := lockWait(ctx, s.lock, syscall.F_WRLCK, k, 1); err != nil {
			s.unlockKey(k)
			release()
			return nil, err
		}
		held = append(held, k)
	}
	return release, nil
}

// volumeKey is the offset of volume name's byte in the lock file.
func volumeKey(name string) int64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return volumeKeyBase + int64(h.Sum64()%(1<<40))
}

// tryLockVolume takes the lock of one volume if nobody, in this process or
// another, holds it; ok is false when someone does.
func (s *LocalStore) tryLockVolume(name string) (release func(), ok bool, err error) {
	k := volumeKey(name)
	s.keysMu.Lock()
	kl := s.keys[k]
	if kl == nil {
		kl = &keyLock{ch: make(chan struct{}, 1)}
		s.keys[k] = kl
	}
	kl.refs++
	s.keysMu.Unlock()
	select {
	case kl.ch <- struct{}{}:
	default:
		s.dropKey(k, kl)
		return nil, false, nil
	}
	if err := tryLock(s.lock, syscall.F_WRLCK, k, 1); err != nil {
		s.unlockKey(k)
		if err == errLocked {
			return nil, false, nil
		}
		return nil, false, err
	}
	return func() {
		unlock(s.lock, k, 1)
		s.unlockKey(k)
	}, true, nil
}

// volumeBusy reports whether someone holds (or waits for) the lock of
// volume name: this process, or another one. It tells a live operation
// from the mark a crashed one left in the metadata.
func (s *LocalStore) volumeBusy(name string) bool {
	k := volumeKey(name)
	s.keysMu.Lock()
	_, here := s.keys[k]
	s.keysMu.Unlock()
	if here {
		return true
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: k, Len: 1}
	if err := syscall.FcntlFlock(s.lock.Fd(), fOFDGetlk, &lk); err != nil {
		return false
	}
	return lk.Type != syscall.F_UNLCK
}

func (s *LocalStore) lockKey(ctx context.Context, k int64) error {
	s.keysMu.Lock()
	kl := s.keys[k]
	if kl == nil {
		kl = &keyLock{ch: make(chan struct{}, 1)}
		s.keys[k] = kl
	}
	kl.refs++
	s.keysMu.Unlock()
	select {
	case kl.ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		s.dropKey(k, kl)
		return ctx.Err()
	}
}

func (s *LocalStore) unlockKey(k int64) {
	s.keysMu.Lock()
	kl := s.keys[k]
	s.keysMu.Unlock()
	<-kl.ch
	s.dropKey(k, kl)
}

func (s *LocalStore) dropKey(k int64, kl *keyLock) {
	s.keysMu.Lock()
	defer s.keysMu.Unlock()
	if kl.refs--; kl.refs == 0 {
		delete(s.keys, k)
	}
}

// newFile is a layer file being written. It is created under a temp name
// and locked (at sweepLockOff) until the metadata that refers to it is
// committed, so that the sweep of another process leaves it alone; then
// release drops the lock.
type newFile struct {
	f         *os.File
	path      string // where the file is now
	final     string // its path once published
	fresh     bool   // final is a new name (not replacing a layer)
	published bool
}

// createFile starts a file that will become layers/name.
func (s *LocalStore) createFile(name string, fresh bool) (*newFile, error) {
	tmp := s.layerPath(tempPrefix + randomHex())
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if err := tryLock(f, syscall.F_WRLCK, sweepLockOff, 1); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("locking %s: %w", tmp, err)
	}
	return &newFile{f: f, path: tmp, final: s.layerPath(name), fresh: fresh}, nil
}

// publish syncs the file, sets its mode and renames it into place (over
// the old file when it replaces one). The directory is synced by the
// caller (syncLayers), once for every file of a mutation.
func (n *newFile) publish(mode os.FileMode) error {
	if err := n.f.Sync(); err != nil {
		return err
	}
	if err := n.f.Chmod(mode); err != nil {
		return err
	}
	if err := os.Rename(n.path, n.final); err != nil {
		return err
	}
	n.path, n.published = n.final, true
	return nil
}

// layerMode is the mode a layer file is published with: a head is written
// by the VM that runs off it, a snapshot's layer is never written again.
func layerMode(head bool) os.FileMode {
	if head {
		return 0o600
	}
	return 0o400
}

// discard removes the file unless it has replaced a layer, and releases it.
func (n *newFile) discard() {
	if !n.published || n.fresh {
		os.Remove(n.path)
	}
	n.f.Close()
}

// release keeps the file and drops its lock: call it after the commit.
func (n *newFile) release() { n.f.Close() }

func (s *LocalStore) syncLayers() error { return syncDir(s.layers) }

// openBacking is the opener of every chain the store opens: a backing
// file must be a layer file of this store, named as the store names them.
func (s *LocalStore) openBacking(ref qcow.BackingRef) (qcow.File, error) {
	if !layerFileRe.MatchString(ref.Name) || (ref.Format != "" && ref.Format != "qcow2") {
		return nil, fmt.Errorf("%w: %q (format %q) of %q is not a layer of the store; refused", qcow.ErrBacking, ref.Name, ref.Format, ref.From)
	}
	// A backing layer is a snapshot's, which nothing writes: its cached
	// metadata serves every chain that reads through it.
	return qcow.OpenImmutableFile(s.layerPath(ref.Name))
}

// openChain opens the chain whose top is the layer file; the top is
// immutable unless it is the head of a volume (see openBacking).
func (s *LocalStore) openChain(file string, immutable bool) (*qcow.Chain, error) {
	open := qcow.OpenFile
	if immutable {
		open = qcow.OpenImmutableFile
	}
	f, err := open(s.layerPath(file))
	if err != nil {
		return nil, err
	}
	format := qcow.FormatQcow2
	return qcow.Open(f, qcow.Options{Open: s.openBacking, Cache: s.cache, Format: &format})
}

// openChainNames is openChain that also returns the file names of the
// layers it opened, top first.
func (s *LocalStore) openChainNames(file string) (*qcow.Chain, []string, error) {
	f, err := qcow.OpenFile(s.layerPath(file))
	if err != nil {
		return nil, nil, err
	}
	names := []string{file}
	format := qcow.FormatQcow2
	c, err := qcow.Open(f, qcow.Options{Cache: s.cache, Format: &format, Open: func(ref qcow.BackingRef) (qcow.File, error) {
		f, err := s.openBacking(ref)
		if err == nil {
			names = append(names, ref.Name)
		}
		return f, err
	}})
	return c, names, err
}

// openResolved opens the chain of the file that resolve picks from the
// current metadata. A commit may remove a file between the reading of the
// metadata and the opening of the chain: the metadata has changed by
// then, so resolve again and retry.
func (s *LocalStore) openResolved(ctx context.Context, resolve func(m *storeMeta) (string, error)) (*qcow.Chain, error) {
	for attempt := 0; ; attempt++ {
		m, err := s.load()
		if err != nil {
			return nil, err
		}
		file, err := resolve(m)
		if err != nil {
			return nil, err
		}
		c, err := s.openChain(file, !m.isHead(file))
		if err == nil || !errors.Is(err, fs.ErrNotExist) || attempt == 4 {
			return c, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
}

func notFound(kind, name string) error { return fmt.Errorf("%w: %s %q", ErrNotFound, kind, name) }

// isHead says whether file is the head of a volume: the one layer that is
// written (by a VM, a flatten, a revert) while it exists.
func (m *storeMeta) isHead(file string) bool {
	for _, v := range m.Volumes {
		if v.Head == file {
			return true
		}
	}
	return false
}

// volume returns volume name of m, or ErrNotFound.
func (m *storeMeta) volume(name string) (*volumeMeta, error) {
	v := m.Volumes[name]
	if v == nil {
		return nil, notFound("volume", name)
	}
	return v, nil
}

// snapshotLayer returns the volume and the index of its snapshot layer.
func (m *storeMeta) snapshotLayer(volume, name string) (*volumeMeta, int, error) {
	v, err := m.volume(volume)
	if err != nil {
		return nil, 0, err
	}
	i := v.findSnapshot(name)
	if i < 0 {
		return nil, 0, fmt.Errorf("%w: snapshot %q of volume %q", ErrNotFound, name, volume)
	}
	return v, i, nil
}

// belowFile returns the file under layer i of v: the layer below it, the
// parent snapshot's layer for the bottom layer of a clone, or "".
func (m *storeMeta) belowFile(v *volumeMeta, i int) string {
	if i > 0 {
		return v.Layers[i-1].File
	}
	if v.Parent != nil {
		if pv, pi, err := m.snapshotLayer(v.Parent.Volume, v.Parent.Snapshot); err == nil {
			return pv.Layers[pi].File
		}
	}
	return ""
}

// chainBelow lists the files from layer i of v down, across clone parents.
func (m *storeMeta) chainBelow(v *volumeMeta, i int) []string {
	var files []string
	for depth := 0; v != nil && depth < qcow.DefaultMaxDepth; depth++ {
		for ; i >= 0; i-- {
			files = append(files, v.Layers[i].File)
		}
		if v.Parent == nil {
			break
		}
		pv, pi, err := m.snapshotLayer(v.Parent.Volume, v.Parent.Snapshot)
		if err != nil {
			break
		}
		v, i = pv, pi
	}
	return files
}

// clonesOf lists the volumes cloned from snapshot snap of volume, sorted.
func (m *storeMeta) clonesOf(volume, snap string) []string {
	var out []string
	for name, v := range m.Volumes {
		if v.Parent != nil && v.Parent.Volume == volume && (snap == "" || v.Parent.Snapshot == snap) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// instancesUsing lists the instances with a disk on volume, sorted.
func (m *storeMeta) instancesUsing(volume string) []string {
	var out []string
	for name, in := range m.Instances {
		for _, d := range in.Disks {
			if d.Volume == volume {
				out = append(out, name)
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

// toVolume describes volume name of m.
func (s *LocalStore) toVolume(m *storeMeta, name string, v *volumeMeta) Volume {
	vol := Volume{
		Name:     name,
		Size:     v.Size,
		Created:  v.Created,
		HeadPath: s.layerPath(v.Head),
		Metadata: copyMetadata(v.Metadata),
	}
	if v.Parent != nil {
		p := *v.Parent
		vol.Parent = &p
	}
	own := []string{v.Head}
	for _, l := range v.Layers {
		own = append(own, l.File)
	}
	for _, f := range own {
		// A file may vanish under a concurrent delete: count what is there.
		if n, err := allocatedBytes(s.layerPath(f)); err == nil {
			vol.BytesUsed += n
		}
	}
	vol.Chain = append(vol.Chain, s.layerPath(v.Head))
	for _, f := range m.chainBelow(v, len(v.Layers)-1) {
		vol.Chain = append(vol.Chain, s.layerPath(f))
	}
	// The mark of a flatten that no live process runs (it crashed) is
	// not progress: the next open or mutation clears it.
	if v.Flatten != nil && s.volumeBusy(name) {
		p := *v.Flatten
		vol.Flatten = &p
	}
	return vol
}

// toSnapshot describes the snapshot at layer i of volume name.
func (s *LocalStore) toSnapshot(m *storeMeta, name string, v *volumeMeta, i int) Snapshot {
	sm := v.Layers[i].Snapshot
	snap := Snapshot{
		Volume:      name,
		Name:        sm.Name,
		Created:     sm.Created,
		Size:        v.Size,
		Consistency: sm.Consistency,
		Metadata:    copyMetadata(sm.Metadata),
		Instance:    sm.Instance,
		Path:        s.layerPath(v.Layers[i].File),
		Clones:      m.clonesOf(name, sm.Name),
	}
	for j := i - 1; j >= 0; j-- {
		if p := v.Layers[j].Snapshot; p != nil {
			snap.Parent = p.Name
			break
		}
	}
	return snap
}

// ListVolumes implements [Backend]: every volume, sorted by name.
func (s *LocalStore) ListVolumes(ctx context.Context) ([]Volume, error) {
	m, err := s.load()
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(m.Volumes))
	for name := range m.Volumes {
		names = append(names, name)
	}
	slices.Sort(names)
	out := make([]Volume, 0, len(names))
	for _, name := range names {
		out = append(out, s.toVolume(m, name, m.Volumes[name]))
	}
	return out, nil
}

// Volume implements [Backend].
func (s *LocalStore) Volume(ctx context.Context, name string) (Volume, error) {
	m, err := s.load()
	if err != nil {
		return Volume{}, err
	}
	v, err := m.volume(name)
	if err != nil {
		return Volume{}, err
	}
	return s.toVolume(m, name, v), nil
}

// checkSize refuses virtual sizes the store does not make.
func checkSize(size int64) error {
	if size <= 0 || size > MaxVolumeSize {
		return fmt.Errorf("%w: volume size %d: want 1 byte to %d TiB", ErrInvalid, size, MaxVolumeSize>>40)
	}
	return nil
}

// CreateVolume implements [Backend]: a volume of one empty qcow2 head. The
// size is rounded up to whole 512-byte sectors, as qemu-img create does.
func (s *LocalStore) CreateVolume(ctx context.Context, name string, size int64) (Volume, error) {
	if err := CheckVolumeName(name); err != nil {
		return Volume{}, err
	}
	if err := checkSize(size); err != nil {
		return Volume{}, err
	}
	size = roundToSector(size)
	release, err := s.lockVolumes(ctx, name)
	if err != nil {
		return Volume{}, err
	}
	defer release()
	if m, err := s.load(); err != nil {
		return Volume{}, err
	} else if m.Volumes[name] != nil {
		return Volume{}, fmt.Errorf("%w: volume %q", ErrExists, name)
	}
	head, err := s.createFile(newLayerName(), true)
	if err != nil {
		return Volume{}, err
	}
	err = qcow.CreateOverlay(head.f, size, 0, "", "")
	if err == nil {
		err = head.publish(layerMode(true))
	}
	if err == nil {
		err = s.syncLayers()
	}
	if err == nil {
		err = s.commit(ctx, func(m *storeMeta) error {
			if m.Volumes[name] != nil {
				return fmt.Errorf("%w: volume %q", ErrExists, name)
			}
			m.Volumes[name] = &volumeMeta{Created: now(), Size: size, Head: filepath.Base(head.final)}
			return nil
		})
	}
	if err != nil {
		head.discard()
		return Volume{}, err
	}
	head.release()
	return s.Volume(ctx, name)
}

// DeleteVolume implements [Backend]. It refuses (ErrBusy) while an
// instance uses the volume, a clone reads through one of its snapshots, or
// qemu has its head open.
func (s *LocalStore) DeleteVolume(ctx context.Context, name string) error {
	release, err := s.lockVolumes(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	m, err := s.load()
	if err != nil {
		return err
	}
	v, err := m.volume(name)
	if err != nil {
		return err
	}
	if err := s.headFree(name, v); err != nil {
		return err
	}
	var files []string
	err = s.commit(ctx, func(m *storeMeta) error {
		v, err := m.volume(name)
		if err != nil {
			return err
		}
		if users := m.instancesUsing(name); len(users) > 0 {
			return fmt.Errorf("%w: volume %q is a disk of instance %s", ErrBusy, name, strings.Join(users, ", "))
		}
		if clones := m.clonesOf(name, ""); len(clones) > 0 {
			return fmt.Errorf("%w: volume %q has clones (%s); flatten them (snapfs volume flatten) or delete them first",
				ErrBusy, name, strings.Join(clones, ", "))
		}
		files = append(files, v.Head)
		for _, l := range v.Layers {
			files = append(files, l.File)
		}
		delete(m.Volumes, name)
		return nil
	})
	if err != nil {
		return err
	}
	pauseAt(PauseVolumeDeleteCommitted)
	for _, f := range files {
		os.Remove(s.layerPath(f))
	}
	return nil
}

// headFree returns ErrBusy when qemu has the head of v open: a VM running
// off it would keep writing to a file that a snapshot freezes or a delete
// replaces.
func (s *LocalStore) headFree(name string, v *volumeMeta) error {
	busy, err := openByQemu(s.layerPath(v.Head))
	if err != nil {
		return err
	}
	if busy {
		return fmt.Errorf("%w: the head of volume %q (%s) is open in qemu; stop the VM (or qemu-io, qemu-nbd) that uses it first",
			ErrBusy, name, s.layerPath(v.Head))
	}
	return nil
}

// OpenHead implements [Backend]. The image reads the head as it is at
// each read (see liveHead): what qemu wrote since, and the new head file
// of a snapshot taken since. Writes that qemu still holds in its own
// metadata cache show once qemu writes that cache back (at a flush).
func (s *LocalStore) OpenHead(ctx context.Context, volume string) (qcow.Image, error) {
	h, err := s.openLiveHead(ctx, volume)
	if err != nil {
		return nil, err // not a nil *liveHead in a non-nil Image
	}
	return h, nil
}

// ImportVolume implements [Backend]. The image, untrusted (see
// OpenUntrusted), is written as the new volume's base layer (a qcow2 file
// of the store, flattened), with an empty head on top; a StagedImage that
// the store can keep as it is becomes the base layer by a rename instead
// (see adoptFile). The volume appears in one metadata commit after both
// files are complete and synced; on any error, or if the process dies,
// nothing appears and the files are removed (at once, or by the next
// OpenLocal). The context's progress function (WithProgress) sees the
// copy.
func (s *LocalStore) ImportVolume(ctx context.Context, name string, src qcow.Image, meta map[string]string) (Volume, error) {
	spec := RestoreSpec{Volumes: []VolumeRestore{{Name: name, Image: src, Metadata: meta}}}
	if err := s.createVolumes(ctx, spec, PauseImportConverting, PauseImportWritten); err != nil {
		return Volume{}, err
	}
	return s.Volume(ctx, name)
}
