package main

import (
	"context"
	"fmt"
	"log"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"snapfs/snapshot"
)

// instanceCmd is `snapfs instance`: named groups of volumes, snapshotted
// together.
var instanceCmd = &cobra.Command{
	Use:   "instance",
	Short: "Define, list, snapshot and restore instances (groups of volumes)",
	Long: `An instance is a named group of volumes, each under a guest device name (vda,
vdb, ...), as the disks of a virtual machine. An instance snapshot takes every
disk at one point: no disk is written between the first and the last.`,
	Args: cobra.NoArgs,
}

var instanceDisks []string

var instanceCreateCmd = &cobra.Command{
	Use:                   "create [--store DIR] [--json] NAME --disk DEVICE=VOLUME...",
	Short:                 "Define an instance over existing volumes",
	Args:                  exactArgs(1),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		if len(instanceDisks) == 0 {
			return usageError{fmt.Errorf("instance %s: give its disks with --disk vda=VOLUME", args[0])}
		}
		var disks []snapshot.Disk
		for _, d := range instanceDisks {
			dev, vol, ok := strings.Cut(d, "=")
			if !ok || dev == "" || vol == "" {
				return usageError{fmt.Errorf("--disk %q: want DEVICE=VOLUME, like vda=root", d)}
			}
			disks = append(disks, snapshot.Disk{Device: dev, Volume: vol})
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			in, err := s.CreateInstance(ctx, args[0], disks)
			if err != nil {
				return err
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), in)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "instance %s: %s\n", in.Name, formatDisks(in.Disks))
			return err
		})
	},
}

// instanceListing is one instance in `snapfs instance list --json`.
type instanceListing struct {
	snapshot.Instance
	Snapshots []snapshot.InstanceSnapshot `json:"snapshots"`
}

var instanceListCmd = &cobra.Command{
	Use:                   "list [--store DIR] [--json]",
	Short:                 "List the instances and their snapshots",
	Args:                  exactArgs(0),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			insts, err := s.ListInstances(ctx)
			if err != nil {
				return err
			}
			list := []instanceListing{}
			for _, in := range insts {
				snaps, err := s.ListInstanceSnapshots(ctx, in.Name)
				if err != nil {
					return err
				}
				list = append(list, instanceListing{Instance: in, Snapshots: snaps})
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), list)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "INSTANCE\tDISKS\tSNAPSHOTS")
			for _, in := range list {
				var names []string
				for _, sn := range in.Snapshots {
					names = append(names, sn.Name)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\n", in.Name, formatDisks(in.Disks), strings.Join(names, " "))
			}
			return w.Flush()
		})
	},
}

var instanceDeleteCmd = &cobra.Command{
	Use:                   "delete [--store DIR] [--json] NAME",
	Short:                 "Remove an instance definition (its volumes stay)",
	Args:                  exactArgs(1),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			if err := s.DeleteInstance(ctx, args[0]); err != nil {
				return err
			}
			return printDeleted(cmd, deletion{Name: args[0]})
		})
	},
}

var instanceSnapshotMeta []string

var instanceSnapshotCmd = &cobra.Command{
	Use:   "snapshot [--store DIR] [--json] [--meta KEY=VALUE]... INSTANCE SNAP",
	Short: "Snapshot every disk of an instance at one point",
	Long: `snapshot takes snapshot SNAP of every disk of INSTANCE at one point, and
records the device mapping and the consistency reached (crash-consistent for
the local store's instances, which never run).`,
	Args:                  exactArgs(2),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		meta, err := parseMeta(instanceSnapshotMeta)
		if err != nil {
			return err
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			snap, err := snapshot.NewManager(s, s).SnapshotInstance(ctx, args[0], args[1], meta)
			if err != nil {
				return err
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), snap)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "instance snapshot %s/%s: %s, taken %s\n",
				snap.Instance, snap.Name, snap.Consistency, snap.Created.Local().Format(time.DateTime))
			return err
		})
	},
}

var instanceDeleteSnapshotCmd = &cobra.Command{
	Use:                   "delete-snapshot [--store DIR] [--json] INSTANCE SNAP",
	Short:                 "Delete an instance snapshot and the disk snapshots it holds",
	Args:                  exactArgs(2),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(args[0] + "/" + args[1])
			err := snapshot.NewManager(s, s).DeleteInstanceSnapshot(snapshot.WithProgress(ctx, bar.Update), args[0], args[1])
			bar.Finish()
			if err != nil {
				return err
			}
			return printDeleted(cmd, deletion{Instance: args[0], Name: args[1]})
		})
	},
}

var instanceRestoreCmd = &cobra.Command{
	Use:   "restore [--store DIR] [--json] DIR [NAME]",
	Short: "Restore an instance snapshot folder copied out of the mount",
	Long: `restore makes new volumes and an instance over them from an instance snapshot
folder copied out of the mount (cp -r MOUNT/instances/INST/snapshots/SNAP DIR):
meta.json and each disk (vda.qcow2, else vda.raw, ...). The instance gets the
same device mapping and an instance snapshot SNAP (same time, consistency and
metadata); each volume gets its user metadata and the disk as snapshot SNAP
under an empty head.

The instance is named NAME, or after the one in meta.json: INST if free, else
INST-restored, INST-restored-2, ...; its volumes are named NAME-DEVICE
(web-vda). Every file is treated as hostile, as an import is. All of it
appears, or (on any error or Ctrl-C) nothing.`,
	Args: func(cmd *cobra.Command, args []string) error {
		if len(args) == 1 || len(args) == 2 {
			return nil
		}
		return fmt.Errorf("usage: %s (see %s --help)", cmd.UseLine(), cmd.CommandPath())
	},
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		dir, name := args[0], ""
		if len(args) == 2 {
			name = args[1]
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(dir)
			in, err := snapshot.RestoreInstance(snapshot.WithProgress(ctx, bar.Update), s, dir, name)
			bar.Finish()
			if err != nil {
				return err
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), in)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "instance %s: %s\n", in.Name, formatDisks(in.Disks))
			return err
		})
	},
}

// instanceRevertLibvirt are the libvirt flags of `snapfs instance revert`.
var instanceRevertLibvirt libvirtFlags

var instanceRevertCmd = &cobra.Command{
	Use:   "revert [--store DIR] [--json] [--libvirt URI] INSTANCE SNAP",
	Short: "Revert a libvirt domain to one of its snapshots",
	Long: `revert makes a shut-off libvirt domain's disks read as snapshot SNAP again: each
file disk gets a new, empty overlay over the snapshot's layer (the snapshot
stays, and can be reverted to again), RBD disks are reverted in their pool. A
memory snapshot (a name ending in +mem) also restores the domain, running,
where it was. A running domain is refused: shut it off first (virsh destroy).

The snapshot records are the mount's, in STORE/libvirt: give the same --store
and --libvirt as the mount. The local store's instances are not reverted as a
whole: revert their volumes (snapfs volume revert).`,
	Args:                  exactArgs(2),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			// Reverting is libvirt's alone: an unreachable default is
			// an error here.
			instanceRevertLibvirt.explicit = true
			instances, closeLibvirt, _, err := withLibvirt(&instanceRevertLibvirt, s, libvirtOptions{
				stateDir: libvirtStateDir(s), store: s, logf: log.New(cmd.ErrOrStderr(), "", 0).Printf,
			})
			if err != nil {
				return err
			}
			defer closeLibvirt()
			if err := snapshot.NewManager(s, instances).RevertInstance(ctx, args[0], args[1]); err != nil {
				return err
			}
			if storeFlags.json {
				// As volume revert: the instance as it is now (a
				// memory snapshot leaves it running).
				in, err := instances.Instance(ctx, args[0])
				if err != nil {
					return err
				}
				return writeJSON(cmd.OutOrStdout(), in)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "instance %s reverted to snapshot %s\n", args[0], args[1])
			return err
		})
	},
}

func init() {
	addStoreFlags(instanceCmd)
	addLibvirtURIFlag(instanceRevertCmd.Flags(), &instanceRevertLibvirt)
	instanceCreateCmd.Flags().StringArrayVar(&instanceDisks, "disk", nil, "a disk as DEVICE=VOLUME, like vda=root (repeatable)")
	instanceSnapshotCmd.Flags().StringArrayVar(&instanceSnapshotMeta, "meta", nil, "user metadata to keep with the snapshot (repeatable)")
	instanceCmd.AddCommand(instanceCreateCmd, instanceListCmd, instanceDeleteCmd, instanceSnapshotCmd, instanceDeleteSnapshotCmd, instanceRestoreCmd, instanceRevertCmd)
	rootCmd.AddCommand(instanceCmd)
}

// formatDisks renders disks as "vda=root vdb=data".
func formatDisks(disks []snapshot.Disk) string {
	var parts []string
	for _, d := range disks {
		parts = append(parts, d.Device+"="+d.Volume)
	}
	return strings.Join(parts, " ")
}
