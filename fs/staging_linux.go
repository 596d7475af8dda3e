package fs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Staging files: where import/NAME is written before it is imported.
//
// Each is created in the staging directory (Config.StagingDir) and holds an
// open file description lock (F_OFD_SETLK) for as long as it is open. The
// lock goes with the process, kill -9 included, so a staging file without
// a lock is an orphan: Mount removes those, and only those, so that two
// mounts of one store can share the directory.

// stagingPrefix starts the name of every staging file.
const stagingPrefix = ".import-"

// fOFDSetlk is F_OFD_SETLK (Linux 3.15+): a lock owned by the open file,
// not by the process.
const fOFDSetlk = 37

// lockStaging locks f, without waiting.
func lockStaging(f *os.File) error {
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	return syscall.FcntlFlock(f.Fd(), fOFDSetlk, &lk)
}

// createStaging creates and locks a new staging file in dir.
func createStaging(dir string) (*os.File, error) {
	f, err := os.CreateTemp(dir, stagingPrefix)
	if err != nil {
		return nil, err
	}
	if err := lockStaging(f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return f, nil
}

// sweepStaging creates dir (0700) if needed and removes the staging files
// that no process holds: what imports cut short by a crash left.
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
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			continue // not ours to judge
		}
		err = lockStaging(f)
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
