// Package qcow reads and writes qcow2 and raw disk images exactly as QEMU
// does, and is safe on hostile input.
//
// An image is opened from a [File] (an [io.ReaderAt] with a size and a
// name), never from a path. Backing images are opened through an injected
// [Opener], so that a qcow2 overlay can sit on a local file, an RBD snapshot
// or anything else that can be read at an offset. [Open] returns a [Chain]:
// the image and all of its backing layers, read as one flattened [Image].
//
// # Errors
//
// Every refusal wraps one of the package sentinels ([ErrCorrupt],
// [ErrUnsupported], [ErrEncrypted], [ErrBacking], [ErrLimit], ...) with a
// message that says what was wrong, so callers test with [errors.Is] and
// show the message to the user. No input makes the package panic or allocate
// without bound: every table size is checked against QEMU's own limits and
// against the size of the file before it is read.
//
// # Concurrency
//
// A [Chain] is safe for concurrent use: ReadAt and Extents may be called from
// many goroutines at once. Metadata (L2 tables) and decompressed clusters are
// kept in a [Cache], which locks itself and is bounded in bytes; several
// chains may share one cache.
//
// # Writing
//
// [NewExport] builds a virtual qcow2 file over any [Image]: an [io.ReaderAt]
// whose size and layout are known before any byte is read and whose bytes
// are the same on every read. [Convert] writes a flattened image to a file,
// as raw (sparse) or as qcow2, optionally compressed.
package qcow
