package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"snapfs/qcow"
)

var convertFlags struct {
	format      string
	compression string
	base        string
}

// convertCmd is `snapfs convert`: qemu-img convert for a chain, written
// atomically.
var convertCmd = &cobra.Command{
	Use:   "convert [-O raw|qcow2] [-c zlib|zstd] [-B BASE] SRC DST",
	Short: "Flatten an image and its backing chain into a new file",
	Long: `convert reads SRC with its whole backing chain and writes the flattened
image to DST, as raw (sparse: holes wherever SRC reads as zeros from
unallocated or zero clusters) or as qcow2 version 3, optionally compressed.

With -B, DST is a qcow2 overlay holding only what differs from BASE, with BASE
recorded as its backing file. As with qemu-img, BASE is stored as given and a
relative BASE is found from DST's directory.

DST appears only once it is complete: the image is written to a temporary file
beside it, flushed to disk and renamed over DST. On any error, or on Ctrl-C,
nothing is left behind.`,
	Args: exactArgs(2),
	// The usage line lists the flags itself.
	DisableFlagsInUseLine: true,
	RunE: func(cmd *cobra.Command, args []string) error {
		return convert(cmd.Context(), args[0], args[1], convertFlags.format, convertFlags.compression, convertFlags.base)
	},
}

func init() {
	f := convertCmd.Flags()
	f.StringVarP(&convertFlags.format, "output-format", "O", "raw", "output format: raw or qcow2")
	f.StringVarP(&convertFlags.compression, "compress", "c", "", "compress qcow2 clusters: zlib or zstd")
	f.StringVarP(&convertFlags.base, "backing", "B", "", "write a qcow2 overlay over BASE holding only the differences")
	rootCmd.AddCommand(convertCmd)
}

// convert writes src, flattened, to dst in the format named by format, with
// the optional compression and base.
func convert(ctx context.Context, src, dst, format, compression, base string) (err error) {
	opts := qcow.ConvertOptions{}
	if opts.Format, err = qcow.ParseFormat(format); err != nil {
		return usageError{fmt.Errorf("-O %s: output format must be raw or qcow2", format)}
	}
	if compression != "" {
		if opts.Format != qcow.FormatQcow2 {
			return usageError{errors.New("-c needs -O qcow2: raw images cannot be compressed")}
		}
		c, err := qcow.ParseCompression(compression)
		if err != nil {
			return usageError{fmt.Errorf("-c %s: compression must be zlib or zstd", compression)}
		}
		opts.Compression = &c
	}
	if base != "" && opts.Format != qcow.FormatQcow2 {
		return usageError{errors.New("-B needs -O qcow2: a raw image cannot have a backing file")}
	}
	mode, err := outputMode(dst)
	if err != nil {
		return err
	}

	chain, err := qcow.OpenPath(src, qcow.Options{})
	if err != nil {
		return inFile(src, err)
	}
	defer chain.Close()
	if base != "" {
		// The base is found as the overlay will find it: from DST's
		// directory, so that DST is usable as soon as it exists.
		basePath := base
		if !filepath.IsAbs(basePath) {
			basePath = filepath.Join(filepath.Dir(dst), base)
		}
		baseChain, baseFormat, err := openBase(basePath)
		if err != nil {
			return inFile(base, err)
		}
		defer baseChain.Close()
		opts.Base, opts.BackingName, opts.BackingFormat = baseChain, base, baseFormat.String()
		if err := refuseOverwrite(dst, basePath); err != nil {
			return err
		}
	}
	if err := refuseOverwrite(dst, src); err != nil {
		return err
	}

	bar := newProgress(filepath.Base(dst))
	defer bar.Finish()
	opts.Progress = bar.Update
	return writeAtomically(dst, mode, func(tmp *os.File) error {
		if err := qcow.Convert(ctx, tmp, chain, opts); err != nil {
			return attributeConvertError(err, src, dst, tmp.Name())
		}
		return nil
	})
}

// openBase opens the base of an overlay and tells its format, which the
// overlay records so that qemu never has to probe it.
func openBase(path string) (*qcow.Chain, qcow.Format, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	format, err := qcow.Probe(f)
	f.Close()
	if err != nil {
		return nil, 0, err
	}
	chain, err := qcow.OpenPath(path, qcow.Options{Format: &format})
	return chain, format, err
}

// outputMode returns the permissions DST gets: those of the file it
// replaces, or 0666 less the umask for a new file, as qemu-img and cp give.
// A DST that exists and is not a regular file (a directory, a block device)
// is refused: renaming over it would replace the device node, not write the
// device.
func outputMode(dst string) (os.FileMode, error) {
	st, err := os.Stat(dst)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return 0o666 &^ currentUmask(), nil
	case err != nil:
		return 0, inFile(dst, err)
	case !st.Mode().IsRegular():
		return 0, inFile(dst, fmt.Errorf("exists and is not a regular file but %s; refusing to replace it", qcow.FileKind(st.Mode())))
	}
	return st.Mode().Perm(), nil
}

// refuseOverwrite fails when dst is the same file as input: the rename would
// swap the input for its own conversion, which surprises everyone.
func refuseOverwrite(dst, input string) error {
	ds, err := os.Stat(dst)
	if err != nil {
		return nil // DST does not exist yet (or cannot be seen: the write will tell)
	}
	is, err := os.Stat(input)
	if err == nil && os.SameFile(ds, is) {
		return inFile(dst, fmt.Errorf("is the input %s itself; write to another file", input))
	}
	return nil
}

// writeAtomically creates a temporary file beside dst, lets write fill it,
// flushes it to disk and renames it over dst, then flushes the directory so
// the rename survives a crash. On any error the temporary file is removed:
// dst is either the old file or the whole new one, never a partial one.
func writeAtomically(dst string, mode os.FileMode, write func(tmp *os.File) error) (err error) {
	dir := filepath.Dir(dst)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return inFile(dst, fmt.Errorf("creating a temporary file in %s: %w", dir, osCause(err)))
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := write(tmp); err != nil {
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		return inFile(dst, err)
	}
	if err := tmp.Sync(); err != nil {
		return inFile(dst, fmt.Errorf("flushing to disk: %w", osCause(err)))
	}
	if err := tmp.Close(); err != nil {
		return inFile(dst, err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return inFile(dst, fmt.Errorf("renaming the finished image into place: %w", osCause(err)))
	}
	if d, err := os.Open(dir); err == nil {
		// The image is complete and in place; a failed directory flush
		// only weakens crash durability, so it is not an error.
		d.Sync()
		d.Close()
	}
	return nil
}

// attributeConvertError names the file a conversion error is about. Errors
// from the filesystem carry their path: the temporary file stands for DST
// (a full disk, an I/O error), any other path is a layer of SRC's chain.
// Everything else (a corrupt table, a bad compressed cluster) is about SRC.
func attributeConvertError(err error, src, dst, tmpName string) error {
	var pe *os.PathError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return inFile(dst, err)
	case errors.As(err, &pe) && pe.Path == tmpName:
		return inFile(dst, fmt.Errorf("%s: %w", pe.Op, pe.Err))
	case errors.As(err, &pe) && strings.TrimSpace(pe.Path) != "":
		return inFile(pe.Path, fmt.Errorf("%s: %w", pe.Op, pe.Err))
	}
	return inFile(src, err)
}

// osCause strips the operation and path that os errors carry, for messages
// that name the file and the operation themselves.
func osCause(err error) error {
	var pe *os.PathError
	var le *os.LinkError
	switch {
	case errors.As(err, &pe):
		return pe.Err
	case errors.As(err, &le):
		return le.Err
	}
	return err
}
