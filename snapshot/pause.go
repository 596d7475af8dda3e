package snapshot

import (
	"fmt"
	"os"
	"time"
)

// PauseEnv names the environment variable that stops a process at a named
// point inside a mutation, so that a crash test can kill -9 it exactly
// there. When the process reaches the point it prints "snapfs: paused at
// POINT" on stderr and sleeps for an hour. The points are the pause*
// constants below; the variable is read once, at start.
const PauseEnv = "SNAPFS_TEST_PAUSE_AT"

// The named points where PauseEnv can stop a mutation of the local store.
const (
	// PauseSnapshotWritten: the new overlays exist, metadata not yet
	// committed.
	PauseSnapshotWritten = "snapshot-written"
	// PauseSnapshotCommitted: metadata committed, old heads not yet made
	// read-only.
	PauseSnapshotCommitted = "snapshot-committed"
	// PauseDeleteMerging: the intent to delete is committed and the merged
	// child is being written (after the first progress report).
	PauseDeleteMerging = "delete-merging"
	// PauseDeleteMerged: the merged child is written and synced, not yet
	// renamed over the old child.
	PauseDeleteMerged = "delete-merged"
	// PauseDeleteRenamed: the merged child has replaced the old child;
	// metadata still lists the snapshot (the next open finishes the
	// delete).
	PauseDeleteRenamed = "delete-renamed"
	// PauseDeleteCommitted: metadata no longer lists the snapshot; its
	// layer file is not yet removed.
	PauseDeleteCommitted = "delete-committed"
	// PauseImportConverting: the base layer is being written.
	PauseImportConverting = "import-converting"
	// PauseImportWritten: base and head are written, metadata not yet
	// committed.
	PauseImportWritten = "import-written"
	// PauseVolumeDeleteCommitted: the volume is gone from metadata, its
	// files not yet removed.
	PauseVolumeDeleteCommitted = "volume-delete-committed"
	// PauseInstanceDeleteMarked: an instance snapshot is marked for
	// deletion, its disk snapshots not yet deleted.
	PauseInstanceDeleteMarked = "instance-delete-marked"
	// PauseFlattenCopying: the flatten mark is committed and the
	// standalone bottom layer is being written.
	PauseFlattenCopying = "flatten-copying"
	// PauseFlattenCopied: the standalone bottom layer is written, not yet
	// renamed over the old one.
	PauseFlattenCopied = "flatten-copied"
	// PauseFlattenRenamed: the standalone bottom layer is in place; the
	// metadata still names the parent (the next open finishes).
	PauseFlattenRenamed = "flatten-renamed"
	// PauseRevertCopying: the new head is being written (a revert to an
	// older snapshot than the newest).
	PauseRevertCopying = "revert-copying"
	// PauseRevertWritten: the new head is written, not yet committed.
	PauseRevertWritten = "revert-written"
	// PauseRevertCommitted: the new head is committed, the old one's file
	// not yet removed.
	PauseRevertCommitted = "revert-committed"
	// PauseRestoreConverting: the volumes of a restore are being written.
	PauseRestoreConverting = "restore-converting"
	// PauseRestoreWritten: every file of a restore is written, the
	// metadata not yet committed.
	PauseRestoreWritten = "restore-written"
)

var pausePoint = os.Getenv(PauseEnv)

// pauseAt stops the process at point when PauseEnv names it. It costs a
// string comparison otherwise.
func pauseAt(point string) {
	if pausePoint == "" || pausePoint != point {
		return
	}
	fmt.Fprintf(os.Stderr, "snapfs: paused at %s\n", point)
	time.Sleep(time.Hour)
}
