package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"snapfs/internal/units"
	"snapfs/snapshot"
)

// storeFlags are the flags every store command takes (volume, snapshot,
// instance): one process runs one command, so they share the variables.
var storeFlags struct {
	dir  string
	json bool
}

// addStoreFlags gives a command group --store and --json, for all of its
// subcommands.
func addStoreFlags(group *cobra.Command) {
	f := group.PersistentFlags()
	f.StringVar(&storeFlags.dir, "store", "", "store directory (default "+snapshot.DefaultStoreDir()+")")
	f.BoolVar(&storeFlags.json, "json", false, "print JSON instead of text")
}

// openStore opens the store of --store, or the default one.
func openStore(ctx context.Context) (*snapshot.LocalStore, error) {
	dir := storeFlags.dir
	if dir == "" {
		dir = snapshot.DefaultStoreDir()
	}
	return snapshot.OpenLocalContext(ctx, dir)
}

// withStore runs fn on the opened store and closes it.
func withStore(cmd *cobra.Command, fn func(ctx context.Context, s *snapshot.LocalStore) error) error {
	s, err := openStore(cmd.Context())
	if err != nil {
		return err
	}
	defer s.Close()
	return fn(cmd.Context(), s)
}

// volumeCmd is `snapfs volume`: the volumes of the store.
var volumeCmd = &cobra.Command{
	Use:   "volume",
	Short: "Create, list, import, clone, flatten, revert, restore and delete volumes",
	Long: `A volume is a disk image with a chain of snapshots. In the local store it is
a chain of qcow2 files: read-only snapshot layers under a writable head, whose
path (head_path) a VM or qemu-io can open.`,
	Args: cobra.NoArgs,
}

var volumeCreateCmd = &cobra.Command{
	Use:   "create [--store DIR] [--json] NAME SIZE",
	Short: "Create an empty volume",
	Long: `create makes an empty volume of SIZE bytes. SIZE takes the suffixes of qemu-img
(k, M, G, T, P, binary: 10G is 10 GiB) and is rounded up to 512 bytes.`,
	Args:                  exactArgs(2),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		size, err := parseSize(args[1])
		if err != nil {
			return usageError{err}
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			v, err := s.CreateVolume(ctx, args[0], size)
			if err != nil {
				return err
			}
			return printVolume(cmd.OutOrStdout(), v)
		})
	},
}

var volumeListCmd = &cobra.Command{
	Use:                   "list [--store DIR] [--json]",
	Short:                 "List the volumes",
	Args:                  exactArgs(0),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			vols, err := s.ListVolumes(ctx)
			if err != nil {
				return err
			}
			if storeFlags.json {
				// The documents of volumes/VOL/info.json, snapshots
				// and all: a script needs what the table shows.
				infos := make([]snapshot.VolumeInfo, 0, len(vols))
				for _, v := range vols {
					info, err := snapshot.VolumeInfoFor(ctx, s, v)
					if err != nil {
						return err
					}
					infos = append(infos, info)
				}
				return writeJSON(cmd.OutOrStdout(), infos)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tSIZE\tUSED\tSNAPSHOTS\tPARENT\tHEAD")
			for _, v := range vols {
				snaps, err := s.ListSnapshots(ctx, v.Name)
				if err != nil {
					return err
				}
				parent := ""
				if v.Parent != nil {
					parent = v.Parent.Volume + "@" + v.Parent.Snapshot
				}
				if p := v.Flatten; p != nil {
					percent := 0
					if p.Total > 0 {
						percent = int(p.Done * 100 / p.Total)
					}
					parent += fmt.Sprintf(" (flattening %d%%)", percent)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", v.Name, units.FormatSize(v.Size), units.FormatSize(v.BytesUsed), len(snaps), parent, v.HeadPath)
			}
			return w.Flush()
		})
	},
}

var volumeDeleteCmd = &cobra.Command{
	Use:   "delete [--store DIR] [--json] NAME",
	Short: "Delete a volume and all its snapshots",
	Long: `delete removes a volume with its snapshots. It is refused while an instance
uses the volume, a clone reads through one of its snapshots (the message names
the clones), or qemu has its head open.`,
	Args:                  exactArgs(1),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			if err := s.DeleteVolume(ctx, args[0]); err != nil {
				return err
			}
			return printDeleted(cmd, deletion{Name: args[0]})
		})
	},
}

var importMeta []string

var volumeImportCmd = &cobra.Command{
	Use:   "import [--store DIR] [--json] [--meta KEY=VALUE]... FILE NAME",
	Short: "Import a raw or qcow2 image as a new volume",
	Long: `import copies FILE into the store as volume NAME. The format is detected from
the content, never the name. A qcow2 is treated as hostile: backing files,
external data files, encryption, unknown features and impossible sizes are
refused (flatten such an image first: qemu-img convert -O qcow2 IN OUT). Raw
is taken as it is.

The volume appears only once the copy is complete and on disk; on any error
or Ctrl-C nothing is left behind.`,
	Args:                  exactArgs(2),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		file, name := args[0], args[1]
		meta, err := parseMeta(importMeta)
		if err != nil {
			return err
		}
		img, err := snapshot.OpenUntrusted(file)
		if err != nil {
			return inFile(file, err)
		}
		defer img.Close()
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(name)
			v, err := s.ImportVolume(snapshot.WithProgress(ctx, bar.Update), name, img, meta)
			bar.Finish()
			if err != nil {
				return inFile(file, err)
			}
			return printVolume(cmd.OutOrStdout(), v)
		})
	},
}

var volumeCloneCmd = &cobra.Command{
	Use:   "clone [--store DIR] [--json] VOL@SNAP NEW",
	Short: "Make a copy-on-write clone of a snapshot",
	Long: `clone creates volume NEW as a copy-on-write clone of snapshot SNAP of volume
VOL, in constant time: no data is copied. NEW reads through the snapshot until
written; writes (a VM running off its head_path) go to its own layers. The
snapshot cannot be deleted while the clone exists: flatten the clone (snapfs
volume flatten NEW) or delete it first.`,
	Args: func(cmd *cobra.Command, args []string) error {
		if len(args) == 2 && strings.Contains(args[0], "@") || len(args) == 3 {
			return nil
		}
		return fmt.Errorf("usage: %s (see %s --help)", cmd.UseLine(), cmd.CommandPath())
	},
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		vol, snap := snapshotRef(args[:len(args)-1])
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			v, err := s.Clone(ctx, vol, snap, args[len(args)-1])
			if err != nil {
				return err
			}
			return printVolume(cmd.OutOrStdout(), v)
		})
	},
}

// flattenCeph names the pool of `snapfs volume flatten --pool`.
var flattenCeph cephFlags

var volumeFlattenCmd = &cobra.Command{
	Use:   "flatten [--store DIR | --ceph-conf FILE --pool POOL] [--json] NAME",
	Short: "Copy into a clone what it reads from its parent, and cut the link",
	Long: `flatten copies into volume NAME, a clone, everything it still reads from the
snapshot it was cloned from, then cuts the link: the snapshot can then be
deleted. The volume reads the same throughout. It is safe to interrupt (Ctrl-C,
a crash): the clone stays a clone, and flatten can be run again. Progress shows
as a bar on a terminal, and as "flatten" in snapfs volume list --json and in
the mount's info.json. A volume that is no clone is left as it is.

With --pool (and --ceph-conf, --ceph-id), NAME is an RBD image of that pool,
flattened by rbd flatten; its progress shows here only (a mount shows the
parent link until it goes).`,
	Args:                  exactArgs(1),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		if flattenCeph.enabled() {
			return flattenInPool(cmd, args[0])
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			return flattenWithBar(cmd, s, args[0])
		})
	},
}

// flattenInPool is `snapfs volume flatten --pool POOL NAME`.
func flattenInPool(cmd *cobra.Command, name string) error {
	if len(flattenCeph.pools) != 1 {
		return usageError{fmt.Errorf("--pool names the one pool of volume %s, not %d", name, len(flattenCeph.pools))}
	}
	if storeFlags.dir != "" {
		return usageError{errors.New("give --store or --pool, not both")}
	}
	pools, closeCeph, err := openCeph(&flattenCeph, false)
	if err != nil {
		return err
	}
	defer closeCeph()
	return flattenWithBar(cmd, pools[0].Backend, name)
}

// flattenWithBar flattens volume name of b, with a progress bar on a
// terminal, and prints the volume with --json.
func flattenWithBar(cmd *cobra.Command, b snapshot.Backend, name string) error {
	cloner, ok := b.(snapshot.Cloner)
	if !ok {
		return fmt.Errorf("%w: %s has no clones to flatten", snapshot.ErrUnsupported, b.Name())
	}
	bar := newProgress(name)
	err := cloner.Flatten(snapshot.WithProgress(cmd.Context(), bar.Update), name)
	bar.Finish()
	if err != nil {
		return err
	}
	return printQuiet(cmd, b, name)
}

var volumeRevertCmd = &cobra.Command{
	Use:   "revert [--store DIR] [--json] VOL SNAP",
	Short: "Make a volume's head read as one of its snapshots again",
	Long: `revert makes the head of volume VOL read exactly as snapshot SNAP: what the
head held is dropped. SNAP and every other snapshot are kept. Reverting to the
newest snapshot costs nothing; to an older one, a copy of what changed since
it. It is refused while a VM (qemu) has the head open, and safe to interrupt:
the head reads as before, or as SNAP. VOL@SNAP works too.`,
	Args:                  snapshotRefArgs,
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		vol, snap := snapshotRef(args)
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(vol + "@" + snap)
			err := s.Revert(snapshot.WithProgress(ctx, bar.Update), vol, snap)
			bar.Finish()
			if err != nil {
				return err
			}
			return printQuiet(cmd, s, vol)
		})
	},
}

var volumeRestoreCmd = &cobra.Command{
	Use:   "restore [--store DIR] [--json] DIR|FILE [NAME]",
	Short: "Restore a volume snapshot folder copied out of the mount",
	Long: `restore makes a new volume from a volume snapshot folder copied out of the
mount (cp -r MOUNT/volumes/VOL/snapshots/SNAP DIR): its disk (disk.qcow2, else
disk.raw) and meta.json. FILE names the disk file itself, with the meta.json
beside it. The volume gets the volume's user metadata, and the content as
snapshot SNAP (same name, time, consistency and metadata) under an empty head.

It is named NAME, or after the volume in meta.json: VOL if free, else
VOL-restored, VOL-restored-2, ... Every file is treated as hostile, as an
import is; on any error or Ctrl-C nothing is created.`,
	Args: func(cmd *cobra.Command, args []string) error {
		if len(args) == 1 || len(args) == 2 {
			return nil
		}
		return fmt.Errorf("usage: %s (see %s --help)", cmd.UseLine(), cmd.CommandPath())
	},
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		path, name := args[0], ""
		if len(args) == 2 {
			name = args[1]
		}
		disk, meta, err := volumeExport(path)
		if err != nil {
			return inFile(path, err)
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(path)
			v, err := snapshot.RestoreVolume(snapshot.WithProgress(ctx, bar.Update), s, disk, meta, name)
			bar.Finish()
			if err != nil {
				return err
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), v)
			}
			snaps, err := s.ListSnapshots(ctx, v.Name)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "volume %s: %s, snapshot %s, head %s\n", v.Name, units.FormatSize(v.Size), snaps[0].Name, v.HeadPath)
			return err
		})
	},
}

// volumeExport returns the disk file and meta.json of a volume snapshot
// folder (or of its disk file).
func volumeExport(path string) (disk, meta string, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", "", err
	}
	if !fi.IsDir() {
		meta = filepath.Join(filepath.Dir(path), snapshot.MetaFileName)
		if _, err := os.Lstat(meta); err != nil {
			return "", "", fmt.Errorf("no %s beside it (%v); to import a disk without its metadata, use snapfs volume import", snapshot.MetaFileName, err)
		}
		return path, meta, nil
	}
	meta = filepath.Join(path, snapshot.MetaFileName)
	if kind, err := snapshot.MetaKind(meta); err == nil && kind == snapshot.KindInstanceSnapshot {
		return "", "", fmt.Errorf("an instance snapshot folder: restore it with snapfs instance restore")
	}
	disk, err = snapshot.DiskFile(path, snapshot.VolumeDiskName)
	return disk, meta, err
}

// printQuiet prints volume name with --json; a mutation that worked says
// nothing otherwise, as delete does.
func printQuiet(cmd *cobra.Command, s snapshot.Backend, name string) error {
	if !storeFlags.json {
		return nil
	}
	v, err := s.Volume(cmd.Context(), name)
	if err != nil {
		return err
	}
	return writeJSON(cmd.OutOrStdout(), v)
}

// deletion is the --json output of the delete commands: what is gone, named
// by the keys of its own JSON (name, and volume or instance for a snapshot),
// so that a script reads it as it reads what create printed.
type deletion struct {
	Instance string `json:"instance,omitempty"`
	Volume   string `json:"volume,omitempty"`
	Name     string `json:"name"`
	Deleted  bool   `json:"deleted"`
}

// printDeleted prints d with --json; a delete that worked says nothing
// otherwise.
func printDeleted(cmd *cobra.Command, d deletion) error {
	if !storeFlags.json {
		return nil
	}
	d.Deleted = true
	return writeJSON(cmd.OutOrStdout(), d)
}

func init() {
	addStoreFlags(volumeCmd)
	volumeImportCmd.Flags().StringArrayVar(&importMeta, "meta", nil, "user metadata to keep with the volume (repeatable)")
	addCephFlags(volumeFlattenCmd.Flags(), &flattenCeph)
	volumeCmd.AddCommand(volumeCreateCmd, volumeListCmd, volumeDeleteCmd, volumeImportCmd,
		volumeCloneCmd, volumeFlattenCmd, volumeRevertCmd, volumeRestoreCmd)
	rootCmd.AddCommand(volumeCmd)
}

// printVolume prints a volume that was just made: JSON, or one line.
func printVolume(w io.Writer, v snapshot.Volume) error {
	if storeFlags.json {
		return writeJSON(w, v)
	}
	_, err := fmt.Fprintf(w, "volume %s: %s, head %s\n", v.Name, units.FormatSize(v.Size), v.HeadPath)
	return err
}

// parseSize reads a size as qemu-img does: bytes, or a number with a
// binary suffix (k/K, M, G, T, P, E, optionally followed by "B" or "iB").
func parseSize(s string) (int64, error) {
	num := strings.TrimSuffix(strings.TrimSuffix(s, "iB"), "B")
	if num != s && num == "" {
		return 0, fmt.Errorf("size %q: want a number, like 10G", s)
	}
	shift := 0
	if n := len(num); n > 0 {
		if i := strings.IndexByte("kmgtpe", lower(num[n-1])); i >= 0 {
			shift, num = 10*(i+1), num[:n-1]
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsNaN(v) {
		return 0, fmt.Errorf("size %q: want a number of bytes with an optional k, M, G, T suffix, like 10G", s)
	}
	bytes := v * math.Pow(2, float64(shift))
	if bytes >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too big", s)
	}
	return int64(math.Ceil(bytes)), nil
}

func lower(b byte) byte {
	if b >= 'A' && b <= 'Z' {
		return b + 'a' - 'A'
	}
	return b
}

// parseMeta turns KEY=VALUE flags into a map.
func parseMeta(pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	meta := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, usageError{fmt.Errorf("--meta %q: want KEY=VALUE", p)}
		}
		meta[k] = v
	}
	return meta, nil
}
