//go:build libvirt && cgo

package virt

import (
	"errors"
	"fmt"

	"libvirt.org/go/libvirt"

	"snapfs/snapshot"
)

// wrap turns a libvirt error into one that wraps the matching sentinel of
// package snapshot (so that fs maps it without importing libvirt) and the
// libvirt error itself (errors.As finds its code). what says what was
// being done.
func wrap(err error, what string) error {
	if err == nil {
		return nil
	}
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return fmt.Errorf("%s: %w", what, err)
	}
	switch lerr.Code {
	case libvirt.ERR_NO_DOMAIN:
		return fmt.Errorf("%s: %w: %w", what, snapshot.ErrNotFound, err)
	case libvirt.ERR_OPERATION_INVALID:
		// The domain is not in a state that allows it (not running,
		// running when it must be off, a block job under way).
		return fmt.Errorf("%s: %w: %w", what, snapshot.ErrBusy, err)
	case libvirt.ERR_NO_SUPPORT, libvirt.ERR_OPERATION_UNSUPPORTED, libvirt.ERR_ARGUMENT_UNSUPPORTED,
		libvirt.ERR_CONFIG_UNSUPPORTED:
		return fmt.Errorf("%s: %w: %w", what, snapshot.ErrUnsupported, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// wrapAgent is wrap for calls that go through the guest agent: a missing,
// disconnected, unresponsive or unsynced agent (or one the driver does not
// support) becomes an *agentError.
func wrapAgent(err error, what string) error {
	if err == nil {
		return nil
	}
	var lerr libvirt.Error
	if errors.As(err, &lerr) {
		switch lerr.Code {
		case libvirt.ERR_AGENT_UNRESPONSIVE, libvirt.ERR_AGENT_UNSYNCED, libvirt.ERR_OPERATION_TIMEOUT,
			libvirt.ERR_ARGUMENT_UNSUPPORTED, libvirt.ERR_OPERATION_UNSUPPORTED, libvirt.ERR_NO_SUPPORT:
			return fmt.Errorf("%s: %w", what, &agentError{err})
		case libvirt.ERR_OPERATION_FAILED, libvirt.ERR_INTERNAL_ERROR:
			// The agent answered with an error (a filesystem that
			// failed to freeze): still no quiesced snapshot.
			return fmt.Errorf("%s: %w", what, &agentError{err})
		}
	}
	return wrap(err, what)
}

// isCode says whether err is a libvirt error with one of the codes.
func isCode(err error, codes ...libvirt.ErrorNumber) bool {
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return false
	}
	for _, c := range codes {
		if lerr.Code == c {
			return true
		}
	}
	return false
}
