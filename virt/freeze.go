//go:build libvirt && cgo

package virt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/snapshot"
)

// frozen is one freeze of one domain's guest filesystems: from the freeze
// call until a thaw succeeds. Its window is bounded by a timer; its thaw
// may be asked for by the caller and by the timer, and runs once.
type frozen struct {
	p          *Provider
	uuid, name string
	started    time.Time // the freeze call began: the guest may be frozen from here
	ready      time.Time // the freeze call returned
	timer      *time.Timer

	thawMu sync.Mutex // serialises thaw attempts; held across libvirt calls

	mu       sync.Mutex // protects the fields below
	thawed   bool       // a thaw succeeded, or there is nothing left to thaw
	thawedAt time.Time
	expired  bool // the timer fired before the caller thawed
	// record names the snapshot whose Frozen the thaw updates (the
	// generic InstanceProvider path, where the thaw comes after the
	// record is written).
	record string
}

// frozenFor returns how long the guest may have been frozen: from the
// start of the freeze to the end of the thaw (or to now, if not thawed).
func (f *frozen) frozenFor() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.thawed {
		return f.thawedAt.Sub(f.started)
	}
	return time.Since(f.started)
}

// freeze freezes the guest filesystems of dom. On error the thaw has been
// attempted already (a freeze that fails half-way, or whose agent dies,
// may leave some filesystems frozen), and the error wraps ErrAgent when the
// agent is the cause; the freeze is returned all the same when the guest
// may have been frozen for a while, so that its window can be recorded.
// The window timer starts with the freeze call.
func (p *Provider) freeze(ctx context.Context, dom *libvirt.Domain, name, uuid string) (*frozen, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if p.cfg.AgentTimeout > 0 {
		secs := int((p.cfg.AgentTimeout + time.Second - 1) / time.Second)
		// Drivers without it (the test driver) have no agent to hang.
		if err := dom.AgentSetResponseTimeout(secs, 0); err != nil && !isCode(err, libvirt.ERR_NO_SUPPORT) {
			return nil, wrapAgent(err, fmt.Sprintf("instance %q: set the guest agent timeout", name))
		}
	}
	f := &frozen{p: p, uuid: uuid, name: name, started: time.Now()}
	p.freezesMu.Lock()
	if p.freezes[uuid] != nil {
		p.freezesMu.Unlock()
		return nil, fmt.Errorf("%w: instance %q is being frozen already", snapshot.ErrBusy, name)
	}
	p.freezes[uuid] = f
	p.freezesMu.Unlock()
	f.timer = time.AfterFunc(p.cfg.FreezeTimeout, f.expire)

	err := dom.FSFreeze(nil, 0)
	f.ready = time.Now()
	if err == nil {
		return f, nil
	}
	ferr := wrapAgent(err, fmt.Sprintf("instance %q: freeze", name))
	// A freeze that never reached the guest needs no thaw retries: one
	// attempt, for form. Anything else may have frozen some filesystems.
	retry := !notConnected(err) && !isCode(err, libvirt.ERR_ARGUMENT_UNSUPPORTED, libvirt.ERR_NO_SUPPORT,
		libvirt.ERR_OPERATION_UNSUPPORTED, libvirt.ERR_OPERATION_INVALID)
	if !retry {
		f.thawMu.Lock()
		f.thawOnce()
		f.thawMu.Unlock()
		f.done()
		return nil, ferr
	}
	if terr := f.thawRetry(context.WithoutCancel(ctx), true); terr != nil {
		return f, errors.Join(ferr, terr)
	}
	return f, ferr
}

// notConnected says whether an agent error means the command never reached
// the guest: libvirt has no agent connection at all. libvirt has one code
// for every agent failure, so this reads its message; if the message ever
// changes, the thaw after a failed freeze is retried for ThawTimeout
// instead: slower, never less safe.
func notConnected(err error) bool {
	var lerr libvirt.Error
	return errors.As(err, &lerr) && lerr.Code == libvirt.ERR_AGENT_UNRESPONSIVE &&
		strings.Contains(lerr.Message, "is not connected")
}

// expire is the window timer: the snapshot took too long, thaw now.
func (f *frozen) expire() {
	f.mu.Lock()
	if f.thawed {
		f.mu.Unlock()
		return
	}
	f.expired = true
	f.mu.Unlock()
	f.p.cfg.Logf("virt: instance %q: the freeze window of %v ran out; thawing", f.name, f.p.cfg.FreezeTimeout)
	if err := f.thawRetry(context.Background(), true); err != nil {
		f.p.cfg.Logf("%v", err) // ErrThaw says "virt: " already
	}
}

// thaw thaws the guest (see thawRetry); it may be called more than once.
func (f *frozen) thaw(ctx context.Context) error {
	f.timer.Stop()
	return f.thawRetry(ctx, true)
}

// thawRetry thaws the guest filesystems once for the freeze, whoever asks
// first; later calls wait for it and return nil once it succeeded. The
// thaw runs even when ctx is done (only its deadline, if later, extends
// the retries). While the agent does not answer (restarting after a crash,
// hung) it is retried for up to ThawTimeout when retry is set; if it still
// fails, a background retry carries on until the provider is closed, and
// the error wraps ErrThaw.
func (f *frozen) thawRetry(ctx context.Context, retry bool) error {
	f.thawMu.Lock()
	defer f.thawMu.Unlock()
	f.mu.Lock()
	done := f.thawed
	f.mu.Unlock()
	if done {
		return nil
	}
	deadline := time.Now().Add(f.p.cfg.ThawTimeout)
	if d, ok := ctx.Deadline(); ok && d.After(deadline) {
		deadline = d
	}
	delay := 50 * time.Millisecond
	var err error
	for {
		var final bool
		final, err = f.thawOnce()
		if err == nil || final {
			break
		}
		if !retry || time.Now().Add(delay).After(deadline) {
			break
		}
		select {
		case <-time.After(delay):
		case <-f.p.closed:
			return fmt.Errorf("%w: instance %q: provider closed: %w", ErrThaw, f.name, err)
		}
		delay = min(2*delay, time.Second)
	}
	if err == nil {
		return nil
	}
	err = fmt.Errorf("%w: instance %q: the guest filesystems may still be frozen: %w", ErrThaw, f.name, err)
	if retry {
		f.p.bg.Add(1)
		go f.thawInBackground()
	}
	return err
}

// thawOnce makes one thaw attempt. final says that retrying is pointless:
// the thaw worked, there is nothing left to thaw (the domain stopped), or
// the domain has no agent at all.
func (f *frozen) thawOnce() (final bool, err error) {
	conn, err := f.p.connection()
	if err != nil {
		return false, err
	}
	dom, err := conn.LookupDomainByUUIDString(f.uuid)
	if isCode(err, libvirt.ERR_NO_DOMAIN) {
		f.done() // gone: nothing is frozen
		return true, nil
	}
	if err != nil {
		return false, wrap(err, "lookup")
	}
	defer dom.Free()
	err = dom.FSThaw(nil, 0)
	switch {
	case err == nil, isCode(err, libvirt.ERR_OPERATION_INVALID):
		// Thawed, or the domain is not running: nothing is frozen.
		f.done()
		return true, nil
	case isCode(err, libvirt.ERR_ARGUMENT_UNSUPPORTED, libvirt.ERR_NO_SUPPORT, libvirt.ERR_OPERATION_UNSUPPORTED):
		return true, wrapAgent(err, "thaw")
	}
	return false, wrapAgent(err, "thaw")
}

// done marks the freeze over and, when a record waits for it, writes the
// frozen window into the record.
func (f *frozen) done() {
	f.mu.Lock()
	if f.thawed {
		f.mu.Unlock()
		return
	}
	f.thawed, f.thawedAt = true, time.Now()
	record := f.record
	f.mu.Unlock()
	f.timer.Stop()
	f.p.freezesMu.Lock()
	if f.p.freezes[f.uuid] == f {
		delete(f.p.freezes, f.uuid)
	}
	f.p.freezesMu.Unlock()
	if record != "" {
		f.p.setFrozen(f.uuid, record, f.frozenFor())
	}
}

// thawInBackground retries the thaw every 2 s until it works or the
// provider is closed: a guest must not stay frozen because an agent came
// back late.
func (f *frozen) thawInBackground() {
	defer f.p.bg.Done()
	for {
		select {
		case <-f.p.closed:
			return
		case <-time.After(2 * time.Second):
		}
		f.thawMu.Lock()
		final, err := f.thawOnce()
		f.thawMu.Unlock()
		if err == nil {
			f.p.cfg.Logf("virt: instance %q: thawed by the background retry", f.name)
			return
		}
		if final {
			f.p.cfg.Logf("virt: instance %q: giving up the thaw: %v", f.name, err)
			return
		}
	}
}

// stillFrozen says whether the freeze held until now: the window timer has
// not thawed the guest, and the agent reports the filesystems frozen (an
// agent killed or restarted since the freeze may have thawed them: qemu-ga
// thaws when it is stopped). why says what was seen otherwise. Drivers
// that cannot pass agent commands (the test driver) are taken at their
// word.
func (f *frozen) stillFrozen(dom *libvirt.Domain) (ok bool, why string) {
	f.mu.Lock()
	expired, thawed := f.expired, f.thawed
	f.mu.Unlock()
	if expired || thawed {
		return false, fmt.Sprintf("the freeze window of %v ran out before the disks were snapshotted", f.p.cfg.FreezeTimeout)
	}
	secs := int((max(f.p.cfg.AgentTimeout, time.Second) + time.Second - 1) / time.Second)
	out, err := dom.QemuAgentCommand(`{"execute":"guest-fsfreeze-status"}`, libvirt.DomainQemuAgentCommandTimeout(secs), 0)
	if isCode(err, libvirt.ERR_NO_SUPPORT) {
		return true, ""
	}
	if err != nil {
		return false, "the guest agent did not confirm the freeze after the snapshot: " + wrapAgent(err, "fsfreeze-status").Error()
	}
	var reply struct {
		Return string `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &reply); err != nil {
		return false, fmt.Sprintf("the guest agent answered %q to fsfreeze-status", out)
	}
	if reply.Return != "frozen" {
		return false, fmt.Sprintf("the guest agent reported the filesystems %s after the snapshot (thawed by someone else?)", reply.Return)
	}
	return true, ""
}

// Freeze implements [snapshot.InstanceProvider]: it freezes the guest
// filesystems of a running domain and returns the thaw. The freeze is
// bounded: FreezeTimeout after it began, the guest is thawed even if thaw
// is never called. The error wraps snapshot.ErrUnsupported (and ErrAgent)
// when the guest agent is missing or fails, ErrBusy when the domain is not
// running.
func (p *Provider) Freeze(ctx context.Context, name string) (thaw func(context.Context) error, err error) {
	dom, uuid, err := p.lookup(name)
	if err != nil {
		return nil, err
	}
	defer dom.Free()
	state, _, err := dom.GetState()
	if err != nil {
		return nil, wrap(err, fmt.Sprintf("instance %q", name))
	}
	if state != libvirt.DOMAIN_RUNNING {
		return nil, fmt.Errorf("%w: instance %q is %s; only a running guest can be frozen", snapshot.ErrBusy, name, stateName(state))
	}
	f, err := p.freeze(ctx, dom, name, uuid)
	if err != nil {
		return nil, err
	}
	return f.thaw, nil
}

// activeFreeze returns the freeze under way on a domain, if any.
func (p *Provider) activeFreeze(uuid string) *frozen {
	p.freezesMu.Lock()
	defer p.freezesMu.Unlock()
	return p.freezes[uuid]
}
