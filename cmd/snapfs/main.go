// Command snapfs shows disk-image volumes, snapshot chains and instances as
// files, and works on qcow2 and raw images from the command line.
//
// One binary holds every subcommand. Each lives in its own file and adds
// itself to rootCmd from an init function, so adding a command touches no
// other file:
//
//	func init() { rootCmd.AddCommand(fooCmd) }
//
// # Errors
//
// A command returns an error; main prints it as ONE line on stderr,
// "snapfs: FILE: problem" (see [fileError]), and exits with status 1. Usage
// mistakes (an unknown flag, a missing argument) are reported the same way.
//
// # Signals
//
// The first SIGINT or SIGTERM cancels the context that every command gets
// from cmd.Context(): long operations stop, clean up (no partial output is
// left behind) and return context.Canceled. A second one kills the process,
// unless the command catches signals itself (mount does).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"unicode"

	"github.com/spf13/cobra"

	"snapfs/snapshot"
)

// rootCmd is the snapfs command. Subcommands add themselves to it from their
// own init functions.
var rootCmd = &cobra.Command{
	Use:   "snapfs",
	Short: "Disk-image volumes, snapshot chains and instances as files",
	Long: `snapfs shows disk-image volumes, their snapshot chains and instances as a
filesystem: reading a file streams a flattened export (raw or qcow2), mkdir
takes a snapshot and cp into import/ imports an image. Its commands also work
on qcow2 and raw images directly (info, convert).`,
	// main prints errors itself, as one line; cobra would print the usage
	// text after every error, burying the message.
	SilenceUsage:  true,
	SilenceErrors: true,
	// Args stays nil: cobra then reports an unknown subcommand as an error
	// instead of printing the help and exiting 0.
}

func init() {
	// "help" stays, "completion" is noise for a tool this small.
	rootCmd.CompletionOptions.DisableDefaultCmd = true
	// Flag errors come back as errors (printed in one line by main) instead
	// of cobra's usage dump.
	rootCmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	go func() {
		// After the first signal, the next one kills at once (the
		// default), for an operation that is slow to stop.
		<-ctx.Done()
		stop()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes the command line args and returns the exit status. It is
// main without the process around it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	rootCmd.SetArgs(args)
	rootCmd.SetOut(stdout)
	rootCmd.SetErr(stderr)
	if err := rootCmd.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, errorLine(err))
		return 1
	}
	return 0
}

// usageError marks a mistake in the command line rather than in its input.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() + " (see snapfs --help)" }
func (e usageError) Unwrap() error { return e.err }

// exactArgs is cobra.ExactArgs with a message that shows the usage line
// ("usage: snapfs convert [-O raw|qcow2] ... SRC DST") instead of counting
// arguments.
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("usage: %s (see %s --help)", cmd.UseLine(), cmd.CommandPath())
		}
		return nil
	}
}

// fileError ties a problem to the file it is about, so that the error line
// names it: "snapfs: FILE: problem".
type fileError struct {
	Path string
	Err  error
}

// Error returns "FILE: problem". When Err is an *os.PathError about the
// same file (perhaps made absolute on the way), the path is not repeated.
func (e *fileError) Error() string {
	if pe, ok := e.Err.(*os.PathError); ok && samePath(pe.Path, e.Path) {
		return e.Path + ": " + pe.Op + ": " + pe.Err.Error()
	}
	return e.Path + ": " + e.Err.Error()
}

// samePath reports whether a and b name the same path, once made absolute.
func samePath(a, b string) bool {
	if a == b {
		return true
	}
	absA, errA := filepath.Abs(a)
	absB, errB := filepath.Abs(b)
	return errA == nil && errB == nil && absA == absB
}

// Unwrap returns the problem, for errors.Is and errors.As.
func (e *fileError) Unwrap() error { return e.Err }

// inFile wraps err as a problem of the file at path; nil stays nil.
func inFile(path string, err error) error {
	if err == nil {
		return nil
	}
	var fe *fileError
	if errors.As(err, &fe) {
		return err
	}
	return &fileError{Path: path, Err: err}
}

// modelSentinels are the model's sentinel errors. Their "snapshot: " prefix
// tells a Go caller which package failed; on the command line, where every
// error is snapfs's, it reads as if the problem were about a snapshot
// ("snapshot: already exists: volume "v1""), so errorLine drops it.
var modelSentinels = []error{
	snapshot.ErrNotFound, snapshot.ErrExists, snapshot.ErrBusy, snapshot.ErrInvalidName,
	snapshot.ErrReadOnly, snapshot.ErrUnsupported, snapshot.ErrInvalid,
}

// errorLine renders err as the single line snapfs prints on failure. Any
// newline inside the message is folded so the promise of one line holds,
// and other control characters (an image can put terminal escapes in the
// names that errors quote) become '?'.
func errorLine(err error) string {
	msg := err.Error()
	for _, sentinel := range modelSentinels {
		if errors.Is(err, sentinel) {
			_, bare, _ := strings.Cut(sentinel.Error(), ": ")
			msg = strings.Replace(msg, sentinel.Error(), bare, 1)
		}
	}
	if errors.Is(err, context.Canceled) {
		msg = "interrupted"
		var fe *fileError
		if errors.As(err, &fe) {
			msg = fe.Path + ": interrupted"
		}
	}
	msg = strings.Join(strings.Fields(strings.ReplaceAll(msg, "\n", "; ")), " ")
	msg = strings.Map(func(r rune) rune {
		if !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, msg)
	return "snapfs: " + msg
}
