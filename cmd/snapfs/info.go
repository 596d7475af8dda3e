package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"

	"github.com/spf13/cobra"

	"snapfs/internal/units"
	"snapfs/qcow"
)

var infoJSON bool

// infoCmd is `snapfs info`: what qemu-img info says, for a whole chain.
var infoCmd = &cobra.Command{
	Use:   "info [--json] IMAGE",
	Short: "Describe an image and its backing chain",
	Long: `info prints the format, virtual size, cluster size, features and compression
type of IMAGE, its backing chain (the path and format of each layer), the
bytes that hold data, and its internal snapshots. It reads metadata only.

Backing files are opened as qemu-img opens them (relative names against the
directory of the image that names them): use it on images you trust.`,
	Args: exactArgs(1),
	// The usage line lists the flags itself.
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		info, err := describeImage(args[0])
		if err != nil {
			return inFile(args[0], err)
		}
		if infoJSON {
			return writeJSON(cmd.OutOrStdout(), info)
		}
		return printInfo(cmd.OutOrStdout(), info)
	},
}

func init() {
	infoCmd.Flags().BoolVar(&infoJSON, "json", false, "print JSON instead of text")
	rootCmd.AddCommand(infoCmd)
}

// imageInfo is the output of `snapfs info`: the top image's own fields
// first, as qemu-img info shows them, then the whole chain.
type imageInfo struct {
	Filename    string            `json:"filename"`
	Format      qcow.Format       `json:"format"`
	VirtualSize int64             `json:"virtual_size"`
	FileSize    int64             `json:"file_size"`
	ClusterSize int64             `json:"cluster_size,omitempty"`
	Version     int               `json:"version,omitempty"`
	Compression *qcow.Compression `json:"compression_type,omitempty"`
	Features    []string          `json:"features"`
	// AllocatedBytes counts the guest bytes that read from data in any
	// layer of the chain (not zeros, not holes).
	AllocatedBytes int64               `json:"allocated_bytes"`
	BackingFile    string              `json:"backing_file,omitempty"`
	BackingFormat  string              `json:"backing_format,omitempty"`
	DataFile       string              `json:"data_file,omitempty"`
	RefcountBits   int                 `json:"refcount_bits,omitempty"`
	Snapshots      []qcow.SnapshotInfo `json:"snapshots"`
	// Chain lists every layer, the image itself first.
	Chain []qcow.LayerInfo `json:"chain"`
}

// describeImage opens the image at path with its chain and describes it.
func describeImage(path string) (*imageInfo, error) {
	chain, err := qcow.OpenPath(path, qcow.Options{})
	if err != nil {
		return nil, err
	}
	defer chain.Close()
	ci, err := chain.Info()
	if err != nil {
		return nil, err
	}
	if len(ci.Layers) == 0 {
		panic("BUG: qcow.Chain.Info returned no layers")
	}
	top := ci.Layers[0]
	info := &imageInfo{
		Filename:       path,
		Format:         top.Format,
		VirtualSize:    ci.VirtualSize,
		FileSize:       top.FileSize,
		ClusterSize:    top.ClusterSize,
		Version:        top.Version,
		Compression:    top.Compression,
		Features:       top.Features,
		AllocatedBytes: ci.AllocatedBytes,
		BackingFile:    top.BackingName,
		BackingFormat:  top.BackingFormat,
		DataFile:       top.DataFile,
		RefcountBits:   top.RefcountBits,
		Snapshots:      top.Snapshots,
		Chain:          ci.Layers,
	}
	// Empty lists print as [] rather than null: scripts iterate over them.
	if info.Features == nil {
		info.Features = []string{}
	}
	if info.Snapshots == nil {
		info.Snapshots = []qcow.SnapshotInfo{}
	}
	return info, nil
}

// printInfo writes info in the layout of qemu-img info, with the chain and
// the allocation added.
func printInfo(w io.Writer, info *imageInfo) error {
	var b strings.Builder
	fmt.Fprintf(&b, "image: %s\n", printable(info.Filename))
	fmt.Fprintf(&b, "file format: %s\n", info.Format)
	fmt.Fprintf(&b, "virtual size: %s (%d bytes)\n", units.FormatSize(info.VirtualSize), info.VirtualSize)
	fmt.Fprintf(&b, "file size: %s (%d bytes)\n", units.FormatSize(info.FileSize), info.FileSize)
	fmt.Fprintf(&b, "allocated: %s (%d bytes)\n", units.FormatSize(info.AllocatedBytes), info.AllocatedBytes)
	if info.Format == qcow.FormatQcow2 {
		fmt.Fprintf(&b, "cluster_size: %d\n", info.ClusterSize)
		fmt.Fprintf(&b, "compat: %s\n", compatLevel(info.Version))
		if info.Compression != nil {
			fmt.Fprintf(&b, "compression type: %s\n", info.Compression)
		}
		fmt.Fprintf(&b, "refcount bits: %d\n", info.RefcountBits)
		features := "none"
		if len(info.Features) > 0 {
			features = strings.Join(info.Features, ", ")
		}
		fmt.Fprintf(&b, "features: %s\n", features)
	}
	if info.BackingFile != "" {
		actual := info.BackingFile
		if len(info.Chain) > 1 {
			actual = info.Chain[1].Name
		}
		fmt.Fprintf(&b, "backing file: %s (actual path: %s)\n", printable(info.BackingFile), printable(actual))
		if info.BackingFormat != "" {
			fmt.Fprintf(&b, "backing file format: %s\n", printable(info.BackingFormat))
		}
	}
	if info.DataFile != "" {
		fmt.Fprintf(&b, "data file: %s\n", printable(info.DataFile))
	}
	if len(info.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		writeSnapshots(&b, info.Snapshots)
	}
	fmt.Fprintf(&b, "Backing chain (%s):\n", units.Count(len(info.Chain), "layer"))
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  #\tFORMAT\tVIRTUAL SIZE\tALLOCATED\tFILE")
	for i, l := range info.Chain {
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\n", i, l.Format, units.FormatSize(l.VirtualSize), units.FormatSize(l.AllocatedBytes), printable(l.Name))
	}
	tw.Flush()
	// Snapshots of backing layers are rare but real (a base image that
	// was snapshotted internally before it got an overlay): list them too.
	for i, l := range info.Chain[1:] {
		if len(l.Snapshots) > 0 {
			fmt.Fprintf(&b, "Snapshot list of layer %d (%s):\n", i+1, printable(l.Name))
			writeSnapshots(&b, l.Snapshots)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeSnapshots writes a table of internal snapshots.
func writeSnapshots(w io.Writer, snaps []qcow.SnapshotInfo) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTAG\tVM SIZE\tDATE")
	for _, s := range snaps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", printable(s.ID), printable(s.Name), units.FormatSize(int64(s.VMStateBytes)), s.Created.Local().Format("2006-01-02 15:04:05"))
	}
	tw.Flush()
}

// printable returns s as it is when every rune of it prints, and quoted
// otherwise: names come from the image, and an image from elsewhere could
// hide terminal escapes or fake lines of output in them.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// compatLevel names a qcow2 version as qemu-img does ("compat: 1.1").
func compatLevel(version int) string {
	switch version {
	case 2:
		return "0.10"
	case 3:
		return "1.1"
	}
	return fmt.Sprintf("version %d", version)
}
