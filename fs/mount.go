package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"snapfs/snapshot"
)

// Errors about the mount point, found before mounting.
var (
	// ErrStaleMount: the mount point is a FUSE mount whose server died
	// (kill -9, a crash); the kernel answers "transport endpoint is not
	// connected" until it is unmounted.
	ErrStaleMount = errors.New("stale mount")
	// ErrMounted: something is mounted on the mount point already.
	ErrMounted = errors.New("already mounted")
)

// Config says what to mount and how.
type Config struct {
	// Backend holds the volumes and snapshots.
	Backend snapshot.Backend
	// Instances lists instances and takes their snapshots; nil leaves
	// instances/ empty.
	Instances snapshot.InstanceProvider
	// Pools are shown under pools/NAME/, each with its volumes/ and
	// import/ (see pools.go); Backend may be one of them.
	Pools []Pool
	// StagingDir is where imports are written before they are imported:
	// on the store's filesystem, so that the import can be as fast as a
	// rename. It is created if needed, and Mount removes what imports cut
	// short by a crash left there. Empty means os.TempDir().
	StagingDir string
	// ReadOnly refuses every change with EROFS (and mounts "ro").
	ReadOnly bool
	// AllowOther lets other users than the one mounting reach the mount;
	// the kernel then checks the modes (it always does: the mount uses
	// default_permissions).
	AllowOther bool
	// UID and GID own every file.
	UID, GID uint32
	// Umask clears permission bits of every file and directory. The bits
	// of "other" are always cleared: disk images hold whole guest
	// filesystems.
	Umask uint32
	// Debug logs every FUSE request.
	Debug bool
	// Logger gets one line per unexpected error and per import; nil is
	// log.Default().
	Logger *log.Logger
	// SelfAccess is for a process that opens files of its own mount (the
	// package's tests): Mount then runs go-fuse's poll hack (WaitMount),
	// which opens and polls a file of the mount so that the kernel stops
	// sending POLL, which such a process could deadlock on. snapfs mount
	// never touches its own files and skips it: a SIGKILL landing inside
	// the hack left a thread waiting for an answer only the dying process
	// could give, and the mount point hung until the connection was
	// aborted through /sys/fs/fuse/connections.
	SelfAccess bool
}

// Server is a mounted snapfs.
type Server struct {
	fuse       *fuse.Server
	fsys       *filesystem
	mountpoint string
}

// Mount mounts the model on mountpoint and serves it until it is
// unmounted (Unmount, fusermount3 -u). It refuses a mount point that is a
// stale mount or is mounted already, saying how to fix it.
func Mount(mountpoint string, cfg Config) (*Server, error) {
	if cfg.Backend == nil {
		return nil, errors.New("fs: Mount needs a backend")
	}
	if err := checkPools(cfg.Pools); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, err
	}
	if err := CheckMountpoint(abs); err != nil {
		return nil, err
	}
	fsys := newFilesystem(cfg)
	if err := sweepStaging(fsys.staging); err != nil {
		fsys.cancel()
		return nil, fmt.Errorf("staging directory: %w", err)
	}
	mountOpts := []string{"default_permissions"}
	if cfg.ReadOnly {
		mountOpts = append(mountOpts, "ro")
	}
	sec := time.Duration(0)
	opts := &fusefs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther: cfg.AllowOther,
			Options:    mountOpts,
			FsName:     "snapfs:" + cfg.Backend.Name(),
			Name:       "snapfs",
			// Reads of up to 1 MiB per request (kernels since 4.20):
			// fewer round trips for cat and cp of large exports.
			MaxWrite: ioBlockSize,
			// snapfs has no extended attributes: spare the kernel
			// from asking for security.* on every lookup.
			DisableXAttrs: true,
			Debug:         cfg.Debug,
			Logger:        fsys.log,
		},
		// Each node sets its own timeouts; these are the defaults of
		// what does not (errors).
		EntryTimeout: &sec,
		AttrTimeout:  &sec,
		// Modes are all set by the nodes, umask included: go-fuse
		// must not add 0644 to a mode the umask emptied.
		NullPermissions: true,
		Logger:          fsys.log,
	}
	// fusefs.Mount, with closeOwners between the kernel and the nodes.
	raw := newCloseOwners(fusefs.NewNodeFS(fsys.newRoot(cfg.Pools), opts))
	srv, err := fuse.NewServer(raw, abs, &opts.MountOptions)
	if err == nil {
		// NewServer has mounted and answered INIT: WaitMount only adds
		// the poll hack (see Config.SelfAccess).
		go srv.Serve()
		if cfg.SelfAccess {
			err = srv.WaitMount()
		}
	}
	if err != nil {
		fsys.cancel()
		return nil, fmt.Errorf("mounting on %s: %w", abs, err)
	}
	return &Server{fuse: srv, fsys: fsys, mountpoint: abs}, nil
}

// newFilesystem returns the state of a mount of cfg.
func newFilesystem(cfg Config) *filesystem {
	ctx, cancel := context.WithCancel(context.Background())
	f := &filesystem{
		backend:   cfg.Backend,
		instances: cfg.Instances,
		readOnly:  cfg.ReadOnly,
		uid:       cfg.UID,
		gid:       cfg.GID,
		umask:     cfg.Umask & 0o777,
		mounted:   time.Now(),
		log:       cfg.Logger,
		manager:   snapshot.NewManager(cfg.Backend, cfg.Instances),
		staging:   cfg.StagingDir,
		spares:    &spareExports{},
		ctx:       ctx,
		cancel:    cancel,
	}
	if f.log == nil {
		f.log = log.Default()
	}
	if f.staging == "" {
		f.staging = os.TempDir()
	}
	return f
}

// Mountpoint returns the absolute path of the mount.
func (s *Server) Mountpoint() string { return s.mountpoint }

// Wait blocks until the filesystem is unmounted, by Unmount or from
// outside (fusermount3 -u), and then stops what long mutations still run.
func (s *Server) Wait() {
	s.fuse.Wait()
	s.fsys.cancel()
	s.fsys.spares.closeAll()
}

// Unmount unmounts the filesystem. It fails, and the mount stays, while a
// file or directory under it is in use; LazyUnmount detaches it anyway.
func (s *Server) Unmount() error {
	if err := s.fuse.Unmount(); err != nil {
		return fmt.Errorf("unmounting %s: %w", s.mountpoint, err)
	}
	s.fsys.cancel()
	return nil
}

// LazyUnmount detaches the mount from the tree at once; the filesystem
// keeps serving the files that are open and stops (Wait returns) when the
// last is closed (fusermount3 -u -z).
func (s *Server) LazyUnmount() error {
	out, err := exec.Command(fusermount(), "-u", "-z", s.mountpoint).CombinedOutput()
	if err != nil {
		return fmt.Errorf("fusermount3 -u -z %s: %v: %s", s.mountpoint, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// fusermount returns the name of the fusermount program: fusermount3
// (fuse3), else fusermount.
func fusermount() string {
	if _, err := exec.LookPath("fusermount3"); err == nil {
		return "fusermount3"
	}
	return "fusermount"
}

// CheckMountpoint returns an error saying what is wrong with dir as a
// mount point, and how to fix it: a stale mount (ErrStaleMount), a mount
// already there (ErrMounted), not a directory.
func CheckMountpoint(dir string) error {
	stale := fmt.Errorf("%s: %w left by a snapfs that died (transport endpoint is not connected); unmount it with: %s -u %s",
		dir, ErrStaleMount, fusermount(), dir)
	// statfs always reaches the filesystem; a stat may be answered from
	// the kernel's cache of the root's attributes.
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(dir, &sfs); errors.Is(err, syscall.ENOTCONN) {
		return stale
	}
	st, err := os.Stat(dir)
	if errors.Is(err, syscall.ENOTCONN) {
		return stale
	}
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s: not a directory", dir)
	}
	if fstype, ok := mountedAt(dir); ok {
		return fmt.Errorf("%s: %w (%s); unmount it first: %s -u %s", dir, ErrMounted, fstype, fusermount(), dir)
	}
	return nil
}

// mountedAt returns the type of the filesystem mounted on dir, if one is.
func mountedAt(dir string) (fstype string, ok bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || unescapeMountinfo(fields[4]) != dir {
			continue
		}
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) {
				return fields[i+1], true
			}
		}
		return "unknown", true
	}
	return "", false
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := parseOctal(s[i+1 : i+4]); err == nil {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func parseOctal(s string) (byte, error) {
	if len(s) != 3 {
		return 0, errors.New("short")
	}
	var v int
	for _, c := range s {
		if c < '0' || c > '7' {
			return 0, errors.New("not octal")
		}
		v = v*8 + int(c-'0')
	}
	if v > 255 {
		return 0, errors.New("too large")
	}
	return byte(v), nil
}
