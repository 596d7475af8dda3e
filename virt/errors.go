package virt

import (
	"errors"

	"snapfs/snapshot"
)

// Sentinel errors of the package, on top of those of package snapshot.
var (
	// ErrUnavailable: libvirt cannot be reached at the URI.
	ErrUnavailable = errors.New("virt: libvirt not reachable")
	// ErrAgent: the guest agent is missing, not connected, not responding
	// or failed. It matches snapshot.ErrUnsupported too (errors.Is), the
	// error with which an InstanceProvider says a guest cannot be frozen.
	ErrAgent = errors.New("virt: guest agent unavailable")
	// ErrThaw: the thaw failed for as long as it was retried; the guest
	// filesystems may still be frozen (a background retry goes on until
	// the provider is closed).
	ErrThaw = errors.New("virt: thaw failed")
)

// agentError is an agent failure: it matches ErrAgent and
// snapshot.ErrUnsupported, and unwraps to the libvirt error.
type agentError struct{ err error }

func (e *agentError) Error() string { return "guest agent: " + e.err.Error() }
func (e *agentError) Unwrap() error { return e.err }
func (e *agentError) Is(target error) bool {
	return target == ErrAgent || target == snapshot.ErrUnsupported
}
