package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"snapfs/internal/units"
	"snapfs/snapshot"
)

// snapshotCmd is `snapfs snapshot`: the snapshots of volumes.
var snapshotCmd = &cobra.Command{
	Use:   "snapshot",
	Short: "Take, list and delete snapshots of volumes",
	Long: `A snapshot freezes a volume's content: the head becomes a read-only layer and
a new empty head goes on top, in constant time whatever the size. VOL@SNAP
(or VOL SNAP) names snapshot SNAP of volume VOL.`,
	Args: cobra.NoArgs,
}

var snapshotMeta []string

var snapshotCreateCmd = &cobra.Command{
	Use:                   "create [--store DIR] [--json] [--meta KEY=VALUE]... VOL@SNAP",
	Short:                 "Take a snapshot of a volume",
	Args:                  snapshotRefArgs,
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		vol, name := snapshotRef(args)
		meta, err := parseMeta(snapshotMeta)
		if err != nil {
			return err
		}
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			snaps, err := s.CreateSnapshots(ctx, []string{vol}, name, snapshot.SnapshotOptions{Metadata: meta})
			if err != nil {
				return err
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), snaps[0])
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s@%s: %s\n", vol, name, snaps[0].Path)
			return err
		})
	},
}

var snapshotListCmd = &cobra.Command{
	Use:                   "list [--store DIR] [--json] [VOL]",
	Short:                 "List the snapshots of a volume, or of every volume",
	Args:                  cobra.MaximumNArgs(1),
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			var vols []string
			if len(args) == 1 {
				vols = args
			} else {
				all, err := s.ListVolumes(ctx)
				if err != nil {
					return err
				}
				for _, v := range all {
					vols = append(vols, v.Name)
				}
			}
			snaps := []snapshot.Snapshot{}
			for _, vol := range vols {
				list, err := s.ListSnapshots(ctx, vol)
				if err != nil {
					return err
				}
				snaps = append(snaps, list...)
			}
			if storeFlags.json {
				return writeJSON(cmd.OutOrStdout(), snaps)
			}
			return printSnapshots(cmd.OutOrStdout(), snaps)
		})
	},
}

var snapshotDeleteCmd = &cobra.Command{
	Use:   "delete [--store DIR] [--json] VOL@SNAP",
	Short: "Delete a snapshot",
	Long: `delete removes a snapshot. Data that only its layer holds and that later
snapshots or the head still need is first merged into the next layer, so
every other snapshot and the head read exactly as before. It is refused while
a clone reads through the snapshot (the message names the clones: flatten or
delete them first), while it belongs to an instance snapshot, or, for the
newest snapshot, while qemu has the head open.`,
	Args:                  snapshotRefArgs,
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		vol, name := snapshotRef(args)
		return withStore(cmd, func(ctx context.Context, s *snapshot.LocalStore) error {
			bar := newProgress(vol + "@" + name)
			err := s.DeleteSnapshot(snapshot.WithProgress(ctx, bar.Update), vol, name)
			bar.Finish()
			if err != nil {
				return err
			}
			return printDeleted(cmd, deletion{Volume: vol, Name: name})
		})
	},
}

func init() {
	addStoreFlags(snapshotCmd)
	snapshotCreateCmd.Flags().StringArrayVar(&snapshotMeta, "meta", nil, "user metadata to keep with the snapshot (repeatable)")
	snapshotCmd.AddCommand(snapshotCreateCmd, snapshotListCmd, snapshotDeleteCmd)
	rootCmd.AddCommand(snapshotCmd)
}

// snapshotRefArgs accepts VOL@SNAP or VOL SNAP.
func snapshotRefArgs(cmd *cobra.Command, args []string) error {
	switch {
	case len(args) == 1 && strings.Contains(args[0], "@"):
		return nil
	case len(args) == 2:
		return nil
	}
	return fmt.Errorf("usage: %s (see %s --help)", cmd.UseLine(), cmd.CommandPath())
}

// snapshotRef splits the arguments checked by snapshotRefArgs. Volume
// names cannot hold '@', so the first one separates.
func snapshotRef(args []string) (vol, snap string) {
	if len(args) == 2 {
		return args[0], args[1]
	}
	vol, snap, _ = strings.Cut(args[0], "@")
	return vol, snap
}

// printSnapshots prints a table of snapshots.
func printSnapshots(out io.Writer, snaps []snapshot.Snapshot) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "SNAPSHOT\tCREATED\tSIZE\tPARENT\tCONSISTENCY\tINSTANCE\tCLONES")
	for _, sn := range snaps {
		fmt.Fprintf(w, "%s@%s\t%s\t%s\t%s\t%s\t%s\t%s\n", sn.Volume, sn.Name, sn.Created.Local().Format(time.DateTime),
			units.FormatSize(sn.Size), sn.Parent, sn.Consistency, sn.Instance, strings.Join(sn.Clones, ","))
	}
	return w.Flush()
}
