//go:build libvirt && cgo

package virt

import (
	"fmt"
	"sync"
	"syscall"
	"time"

	"libvirt.org/go/libvirt"
)

// A libvirtd that stops answering (a hung daemon, SIGSTOP) must not hang
// the mount: every call to it would wait forever, and ls of instances/
// with it, in an uninterruptible FUSE request. Two bounds:
//   - keepalive on every connection: libvirt closes a connection whose
//     daemon missed keepAliveCount probes keepAliveInterval apart, and the
//     calls waiting on it fail (then connection() dials again);
//   - a dial that does not finish within dialWait gives up (the attempt
//     goes on in the background, one at a time, and is used if it ends).
//
// Keepalive needs libvirt's event loop, which the process runs once.
const (
	keepAliveInterval = 5 // seconds
	keepAliveCount    = 3
	dialWait          = 15 * time.Second
)

var eventLoop sync.Once

// startEventLoop registers and runs libvirt's default event loop, once per
// process, before the first connection (as libvirt requires).
func startEventLoop() {
	eventLoop.Do(func() {
		if err := libvirt.EventRegisterDefaultImpl(); err != nil {
			return // no keepalive: calls are unbounded, as before
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	})
}

// dialResult is the outcome of one libvirt.NewConnect.
type dialResult struct {
	conn *libvirt.Connect
	err  error
}

// dial connects to uri with keepalive, waiting at most dialWait. pending
// is the attempt still under way from an earlier call (or nil), and the
// returned channel the one still under way now (nil when none is): the
// caller keeps it for the next call, so that a daemon that does not answer
// costs one attempt at a time, not one per call.
func dial(uri string, pending chan dialResult) (*libvirt.Connect, chan dialResult, error) {
	startEventLoop()
	if pending == nil {
		pending = make(chan dialResult, 1)
		go func() {
			c, err := libvirt.NewConnect(uri)
			pending <- dialResult{c, err}
		}()
	}
	timer := time.NewTimer(dialWait)
	defer timer.Stop()
	select {
	case r := <-pending:
		if r.err != nil {
			return nil, nil, fmt.Errorf("%w: %s: %w", ErrUnavailable, uri, r.err)
		}
		// The test driver and local drivers have no keepalive: their
		// calls do not go to a daemon.
		r.conn.SetKeepAlive(keepAliveInterval, keepAliveCount)
		return r.conn, nil, nil
	case <-timer.C:
		return nil, pending, fmt.Errorf("%w: %s: libvirtd did not answer within %v: %w", ErrUnavailable, uri, dialWait, syscall.ETIMEDOUT)
	}
}
