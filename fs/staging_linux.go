package fs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"snapfs/internal/directio"
)

// Staging files: where import/NAME, and the files of a folder copied into
// import/, are written before they are imported.
//
// They are created in the staging directory (Config.StagingDir): a file
// of its own for import/NAME, a directory (holding the folder under its
// name) for a folder. Each holds a lock for as long as it is in use: an
// open file description lock (F_OFD_SETLK, read) on a file, flock on a
// directory. Either goes with the process, kill -9 included, so an entry
// without one is an orphan: Mount removes those, and only those, so that
// two mounts of one store can share the directory.
//
// Both kinds of lock are held on read-only descriptors: when the import
// starts, every descriptor that writes is closed, so that the store can
// tell that nobody writes to the file any more, and take it over (see
// snapshot.StagedImage) instead of copying it.

// stagingPrefix starts the name of every staging file and directory.
const stagingPrefix = ".import-"

// fOFDSetlk is F_OFD_SETLK (Linux 3.15+): a lock owned by the open file,
// not by the process.
const fOFDSetlk = 37

// lockStaging locks the staging file f, without waiting: a read lock
// (f is read-only), which the write lock the sweep tries conflicts with.
func lockStaging(f *os.File, typ int16) error {
	lk := syscall.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 1}
	return syscall.FcntlFlock(f.Fd(), fOFDSetlk, &lk)
}

// stagedFile is one file being written in the staging directory. Its
// write descriptor is open while a writer has it open (openWrite,
// closeWrite); keep stays open until the file is dropped.
//
// Writes are answered before they reach the file, and most are direct
// (write_behind.go): whatever reads the file or its size waits for them
// first, and closeWrite returns the first that failed.
//
// A stagedFile is not safe for concurrent use: its owner serialises
// calls (importFile.mu).
type stagedFile struct {
	path string
	// keep is read-only: stat, reads, and the staging lock of a file of
	// its own.
	keep *os.File
	// write, direct (which writes to it with O_DIRECT where it can) and
	// behind, which writes through direct, are nil while closed.
	write  *os.File
	direct *directio.Writer
	behind *writeBehind
}

// createStaging creates, opens for writing and locks a new staging file
// in dir.
func createStaging(dir string) (*stagedFile, error) {
	w, err := os.CreateTemp(dir, stagingPrefix)
	if err != nil {
		return nil, err
	}
	s, err := newStagedFile(w, true)
	if err != nil {
		w.Close()
		os.Remove(w.Name())
		return nil, err
	}
	return s, nil
}

// createStagedIn creates a file called name in dir, a staging directory
// whose lock covers it, and opens it for writing.
func createStagedIn(dir, name string) (*stagedFile, error) {
	path := filepath.Join(dir, name)
	w, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	s, err := newStagedFile(w, false)
	if err != nil {
		w.Close()
		os.Remove(path)
		return nil, err
	}
	return s, nil
}

// newStagedFile opens the rest of a staged file whose write descriptor w
// was just created, locking it if it is a file of its own.
func newStagedFile(w *os.File, lock bool) (*stagedFile, error) {
	keep, err := os.OpenFile(w.Name(), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	if lock {
		if err := lockStaging(keep, syscall.F_RDLCK); err != nil {
			keep.Close()
			return nil, fmt.Errorf("locking %s: %w", w.Name(), err)
		}
	}
	s := &stagedFile{path: w.Name(), keep: keep}
	s.startWriting(w)
	return s, nil
}

// startWriting takes w as the write descriptor, and opens the direct one.
func (s *stagedFile) startWriting(w *os.File) {
	s.write = w
	s.direct = directio.NewWriter(w)
	s.behind = newWriteBehind(s.write, s.direct, writePool)
}

// openWrite opens the write descriptor again, for a new writer.
func (s *stagedFile) openWrite() error {
	if s.write != nil {
		return nil
	}
	w, err := os.OpenFile(s.path, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	s.startWriting(w)
	return nil
}

// closeWrite writes what is queued and closes the write descriptor: the
// file is complete, for now. A write that failed, or an error of close (a
// write-back error of NFS, say), is the writer's.
func (s *stagedFile) closeWrite() error {
	if s.write == nil {
		return nil
	}
	err := s.behind.stop()
	if cerr := s.direct.Close(); err == nil {
		err = cerr
	}
	if cerr := s.write.Close(); err == nil {
		err = cerr
	}
	s.write, s.direct, s.behind = nil, nil, nil
	return err
}

// WriteAt writes p at off, or queues it: see write_behind.go.
func (s *stagedFile) WriteAt(p []byte, off int64) (int, error) {
	if s.write == nil {
		return 0, syscall.EBADF
	}
	return s.behind.WriteAt(p, off)
}

// drain waits for the writes queued, and returns the first that failed.
func (s *stagedFile) drain() error {
	if s.behind == nil {
		return nil
	}
	return s.behind.drain()
}

// ReadAt reads what was written so far. A failed write is not the
// reader's error: it reads what the file holds.
func (s *stagedFile) ReadAt(p []byte, off int64) (int, error) {
	s.drain()
	return s.keep.ReadAt(p, off)
}

// Truncate sets the size of the file, which need not be open for
// writing (truncate(1) of a file already closed).
func (s *stagedFile) Truncate(size int64) error {
	if s.write == nil {
		return os.Truncate(s.path, size)
	}
	if err := s.drain(); err != nil {
		return err
	}
	return s.write.Truncate(size)
}

// Sync makes what was written durable.
func (s *stagedFile) Sync() error {
	if err := s.drain(); err != nil {
		return err
	}
	return s.keep.Sync()
}

// stat returns the size and the allocated bytes of the file, once the
// writes queued are in it.
func (s *stagedFile) stat() (size, allocated int64, err error) {
	s.drain()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(s.keep.Fd()), &st); err != nil {
		return 0, 0, err
	}
	return st.Size, st.Blocks * 512, nil
}

// drop closes the file and removes it, unless the store has taken it
// over: then its path is gone, or names another file.
func (s *stagedFile) drop() {
	s.closeWrite()
	if st, err := s.keep.Stat(); err == nil {
		if at, err := os.Lstat(s.path); err == nil && os.SameFile(st, at) {
			os.Remove(s.path)
		}
	}
	s.keep.Close()
}

// stagingDir is a staging directory: the folder copied into import/ is
// its only entry, under its own name (snapshot.RestoreName reads it).
type stagingDir struct {
	top  string   // the directory in the staging directory
	path string   // top/NAME, the folder
	lock *os.File // top, read-only, flock'ed
}

// createStagingDir creates and locks a staging directory for the folder
// name.
func createStagingDir(staging, name string) (*stagingDir, error) {
	top, err := os.MkdirTemp(staging, stagingPrefix)
	if err != nil {
		return nil, err
	}
	d := &stagingDir{top: top, path: filepath.Join(top, name)}
	if d.lock, err = os.Open(top); err == nil {
		if err = syscall.Flock(int(d.lock.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
			d.lock.Close()
		}
	}
	if err == nil {
		if err = os.Mkdir(d.path, 0o700); err != nil {
			d.lock.Close()
		}
	}
	if err != nil {
		os.RemoveAll(top)
		return nil, fmt.Errorf("staging directory for %s: %w", name, err)
	}
	return d, nil
}

// remove removes the staging directory and everything left in it.
func (d *stagingDir) remove() {
	os.RemoveAll(d.top)
	d.lock.Close()
}

// sweepStaging creates dir (0700) if needed and removes the staging files
// and directories that no process holds: what imports cut short by a
// crash left.
func sweepStaging(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), stagingPrefix) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if e.IsDir() {
			if err := sweepStagingDir(path); err != nil {
				return err
			}
			continue
		}
		f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
		if err != nil {
			continue // not ours to judge
		}
		err = lockStaging(f, syscall.F_WRLCK)
		if err == nil {
			os.Remove(path)
		} else if !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EACCES) {
			f.Close()
			return fmt.Errorf("checking %s: %w", path, err)
		}
		f.Close()
	}
	return nil
}

// sweepStagingDir removes the staging directory path unless it is locked.
func sweepStagingDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return nil // not ours to judge
	}
	defer d.Close()
	err = syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	switch {
	case err == nil:
		return os.RemoveAll(path)
	case errors.Is(err, syscall.EWOULDBLOCK):
		return nil // in use
	}
	return fmt.Errorf("checking %s: %w", path, err)
}
