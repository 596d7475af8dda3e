package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"snapfs/fs"
	"snapfs/snapshot"
)

// mountFlags are the flags of `snapfs mount`.
var mountFlags struct {
	store      string
	readOnly   bool
	allowOther bool
	debug      bool
	uid, gid   uint32
	umask      string
	ceph       cephFlags
	libvirt    libvirtFlags
}

// mountCmd is `snapfs mount`: the store as a filesystem, in the
// foreground.
var mountCmd = &cobra.Command{
	Use:   "mount [--store DIR] [--ceph-conf FILE [--ceph-id ID] --pool POOL[,POOL]] [--libvirt URI] [--require-quiesce] [--read-only] [--allow-other] [--debug] [--uid N --gid N --umask M] MOUNTPOINT",
	Short: "Show the store's volumes, snapshots and instances as files",
	Long: `mount shows the store as a filesystem on MOUNTPOINT, in the foreground, until
it is unmounted: Ctrl-C (SIGINT) or SIGTERM here, or fusermount3 -u MOUNTPOINT
from anywhere. While files are still open, Ctrl-C unmounts once they are
closed; a second Ctrl-C detaches the mount at once (lazy unmount).

  volumes/VOL/snapshots/SNAP/disk.raw    read it to export a snapshot (sparse)
  volumes/VOL/snapshots/SNAP/disk.qcow2  the same as qcow2
  mkdir volumes/VOL/snapshots/SNAP       take a snapshot; rmdir deletes it
  instances/INST/snapshots/SNAP/         every disk of an instance at once
  cp IMAGE MOUNTPOINT/import/NAME        import a raw or qcow2 image as NAME

With --pool, Ceph RBD pools are mounted too: each as pools/POOL/volumes/ and
pools/POOL/import/. The root's volumes/ and import/ are the local store when
--store is given, else the first pool (imports are then staged in $TMPDIR,
else /var/tmp). Clones show their parent, in any pool, as the symlink
volumes/VOL/parent.

instances/ also shows the domains of libvirt (--libvirt URI, default
qemu:///system when it is reachable; "none" turns it off): mkdir
instances/DOM/snapshots/SNAP takes a quiesced snapshot of every disk of a
running domain (crash-consistent without a guest agent, refused then with
--require-quiesce); a name ending in +mem keeps the memory state too.

Only the user who mounts can reach the mount, unless --allow-other; the kernel
then checks the modes, which --uid, --gid and --umask set (files are never
readable by "other").`,
	Args:                  exactArgs(1),
	DisableFlagsInUseLine: true,
	RunE:                  runMount,
}

func init() {
	f := mountCmd.Flags()
	f.StringVar(&mountFlags.store, "store", "", "store directory (default "+snapshot.DefaultStoreDir()+")")
	f.BoolVar(&mountFlags.readOnly, "read-only", false, "refuse every change (EROFS)")
	f.BoolVar(&mountFlags.allowOther, "allow-other", false, "let other users reach the mount (modes still apply; needs user_allow_other in /etc/fuse.conf unless root)")
	f.BoolVar(&mountFlags.debug, "debug", false, "log every FUSE request")
	f.Uint32Var(&mountFlags.uid, "uid", uint32(os.Getuid()), "owner of every file")
	f.Uint32Var(&mountFlags.gid, "gid", uint32(os.Getgid()), "group of every file")
	f.StringVar(&mountFlags.umask, "umask", "077", "permission bits to clear, in octal (\"other\" is always cleared)")
	addCephFlags(f, &mountFlags.ceph)
	addLibvirtFlags(f, &mountFlags.libvirt)
	rootCmd.AddCommand(mountCmd)
}

func runMount(cmd *cobra.Command, args []string) error {
	mountpoint := args[0]
	umask, err := strconv.ParseUint(mountFlags.umask, 8, 32)
	if err != nil || umask > 0o777 {
		return usageError{fmt.Errorf("--umask %q: want octal permission bits, like 027", mountFlags.umask)}
	}
	// A missing mount point is made, as `make run` expects; a stale or
	// busy one is reported by fs.Mount with the fix.
	if err := os.Mkdir(mountpoint, 0o755); err != nil && !errors.Is(err, os.ErrExist) && !errors.Is(err, syscall.ENOTCONN) {
		return inFile(mountpoint, err)
	}

	// The root shows the local store (volumes/, instances/, import/)
	// unless RBD pools are named without --store: then it shows the first
	// pool, and no local store is opened. Every pool also shows under
	// pools/POOL/ (see fs/pools.go).
	var (
		backend   snapshot.Backend
		instances snapshot.InstanceProvider
		pools     []fs.Pool
		shown     []string
		staging   string
		local     *snapshot.LocalStore
	)
	if !mountFlags.ceph.enabled() || cmd.Flags().Changed("store") {
		dir := mountFlags.store
		if dir == "" {
			dir = snapshot.DefaultStoreDir()
		}
		store, err := snapshot.OpenLocalContext(cmd.Context(), dir)
		if err != nil {
			return err
		}
		defer store.Close()
		backend, instances, shown, local = store, store, []string{store.Dir()}, store
		// In the store, so that a crash's leftovers are found again.
		staging = filepath.Join(store.Dir(), "staging")
	}
	if mountFlags.ceph.enabled() {
		var closeCeph func() error
		pools, closeCeph, err = openCeph(&mountFlags.ceph, mountFlags.readOnly)
		if err != nil {
			return err
		}
		// Images must be closed before the cluster, and they are once
		// the mount is gone.
		defer closeCeph()
		for _, p := range pools {
			shown = append(shown, p.Backend.Name())
		}
		if backend == nil {
			backend, staging = pools[0].Backend, poolStagingDir()
		}
	}

	stderr := cmd.ErrOrStderr()
	mountFlags.libvirt.explicit = cmd.Flags().Changed("libvirt")
	instances, closeLibvirt, libvirtNote, err := withLibvirt(&mountFlags.libvirt, instances, libvirtOptions{
		stateDir: libvirtStateDir(local), store: local, pools: pools,
		logf: log.New(stderr, "", log.LstdFlags).Printf,
	})
	if err != nil {
		return err
	}
	defer closeLibvirt()
	srv, err := fs.Mount(mountpoint, fs.Config{
		Backend:    backend,
		Instances:  instances,
		Pools:      pools,
		ReadOnly:   mountFlags.readOnly,
		AllowOther: mountFlags.allowOther,
		UID:        mountFlags.uid,
		GID:        mountFlags.gid,
		Umask:      uint32(umask),
		StagingDir: staging,
		Debug:      mountFlags.debug,
		Logger:     log.New(stderr, "", log.LstdFlags),
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "snapfs: %s mounted on %s; Ctrl-C or fusermount3 -u %s unmounts\n", strings.Join(shown, " and "), srv.Mountpoint(), srv.Mountpoint())
	if libvirtNote != "" {
		fmt.Fprintln(stderr, libvirtNote)
	}

	unmounted := make(chan struct{})
	go func() {
		srv.Wait()
		close(unmounted)
	}()
	requests := unmountRequests(cmd.Context(), unmounted)
	// retry ticks while a first request found the mount busy: the message
	// tells the user to close what is open, and closing it must then be
	// enough to unmount.
	var retry <-chan time.Time
	for asked := 0; ; {
		select {
		case <-unmounted:
			return nil
		case <-retry:
			if srv.Unmount() == nil {
				retry = nil
			}
			continue
		case <-requests:
			asked++
		}
		if asked == 1 {
			if err := srv.Unmount(); err != nil {
				fmt.Fprintf(stderr, "snapfs: %s is busy (a file or directory under it is in use): close it and snapfs unmounts, or press Ctrl-C again to detach the mount now\n", srv.Mountpoint())
				ticker := time.NewTicker(busyRetry)
				defer ticker.Stop()
				retry = ticker.C
			}
			continue
		}
		retry = nil
		if err := srv.LazyUnmount(); err != nil {
			return err
		}
	}
}

// busyRetry is how often a mount that was busy at Ctrl-C tries to unmount
// again, until what was open is closed or a second Ctrl-C detaches it.
const busyRetry = 500 * time.Millisecond

// unmountRequests returns a channel that receives one value per request to
// unmount: the end of ctx (main ends it at the first SIGINT or SIGTERM, a
// test by cancelling it) and every SIGINT and SIGTERM. The first signal
// ends ctx and arrives as a signal too; it counts once.
func unmountRequests(ctx context.Context, unmounted <-chan struct{}) <-chan struct{} {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	requests := make(chan struct{}, 4)
	go func() {
		defer signal.Stop(sigs)
		done := ctx.Done()
		// A signal seen on one side is waited for briefly on the other.
		const twin = 200 * time.Millisecond
		for {
			select {
			case <-unmounted:
				return
			case <-done:
				done = nil
				select {
				case <-sigs:
				case <-time.After(twin):
				}
			case <-sigs:
				if done != nil {
					select {
					case <-done:
						done = nil
					case <-time.After(twin):
					}
				}
			}
			requests <- struct{}{}
		}
	}()
	return requests
}
