//go:build libvirt && cgo

package virt

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// MemorySuffix marks, at the end of a snapshot name, a snapshot that also
// holds the memory state when it is taken through the generic
// [snapshot.InstanceProvider] methods (mkdir instances/I/snapshots/S+mem).
const MemorySuffix = "+mem"

// testHookFrozen, when set by a test, runs while the guest is frozen, before
// the disk snapshots: a test makes the window long enough there for the
// agent to die in it.
var testHookFrozen func()

// SnapshotOptions go with [Provider.SnapshotDisks].
type SnapshotOptions struct {
	// Memory adds the memory state (running or paused domains only, file
	// disks only). The guest is not frozen for it: see the package doc.
	Memory bool
	// RequireQuiesce refuses a running domain that cannot be frozen (on
	// top of Config.RequireQuiesce).
	RequireQuiesce bool
	// NoFreeze takes the snapshot of a running domain without freezing
	// it: crash-consistent at best. For comparisons and tests.
	NoFreeze bool
	Metadata map[string]string
}

// SnapshotDisks takes snapshot name of every disk of a domain at one point
// (see the package doc: freeze, one atomic snapshot, verify, thaw) and
// records it. The record says which consistency was achieved, how long the
// guest was frozen, the domain XML and, for each device, the layer that
// holds the snapshot (Record.Layers).
//
// A shut-off domain's disks are snapshotted directly (libvirt makes the
// overlays with qemu-img and changes the definition), with no agent; the
// snapshot is crash-consistent (nothing writes to the disks). A paused
// domain is not frozen (its agent cannot answer).
//
// When the snapshot was taken but the thaw failed, both the record and an
// error wrapping ErrThaw are returned.
func (p *Provider) SnapshotDisks(ctx context.Context, domain, name string, opts SnapshotOptions) (Record, error) {
	return p.snapshot(ctx, domain, name, opts, nil)
}

// plannedDisk is one disk a snapshot takes.
type plannedDisk struct {
	Disk
	overlay string           // file disks: the new overlay
	backend snapshot.Backend // RBD disks: the pool's backend
	// head is set for a file disk that is a local-store volume's head:
	// the store prepared overlay, and commits the switch (Config.Store).
	head *snapshot.ExternalHead
}

// snapshot is SnapshotDisks; held, when set, is a freeze the caller made
// through Freeze (the generic InstanceProvider path): the snapshot does not
// freeze again, and checks that one instead.
func (p *Provider) snapshot(ctx context.Context, domain, name string, opts SnapshotOptions, held *frozen) (Record, error) {
	if err := snapshot.CheckNewSnapshotName(name); err != nil {
		return Record{}, err
	}
	dom, uuid, err := p.lookup(domain)
	if err != nil {
		return Record{}, err
	}
	defer dom.Free()
	release, err := p.lockDomain(ctx, uuid)
	if err != nil {
		return Record{}, err
	}
	defer release()
	recs, err := p.records.load(uuid)
	if err != nil {
		return Record{}, err
	}
	if i := recs.find(name); i >= 0 {
		return Record{}, fmt.Errorf("%w: snapshot %q of instance %q", snapshot.ErrExists, name, domain)
	}
	info, err := p.describe(dom)
	if err != nil {
		return Record{}, err
	}
	running := info.state == libvirt.DOMAIN_RUNNING || info.state == libvirt.DOMAIN_BLOCKED
	live := running || info.state == libvirt.DOMAIN_PAUSED
	if !live && info.state != libvirt.DOMAIN_SHUTOFF {
		return Record{}, fmt.Errorf("%w: instance %q is %s; snapshot it running, paused or shut off", snapshot.ErrBusy, domain, stateName(info.state))
	}
	if opts.Memory && !live {
		return Record{}, fmt.Errorf("%w: instance %q is shut off: it has no memory state to snapshot", snapshot.ErrInvalid, domain)
	}

	plan, skipped, err := p.plan(info, opts.Memory)
	if err != nil {
		return Record{}, err
	}
	rec := Record{
		Name: name, Created: time.Now().UTC(), State: stateName(info.state),
		DomainXML: info.xml, Metadata: maps.Clone(opts.Metadata),
		Consistency: snapshot.CrashConsistent,
	}
	if opts.Memory {
		rec.Memory, err = newFileName(filepath.Dir(firstFile(plan)), "memory-"+uuid[:8], ".mem")
		if err != nil {
			return Record{}, err
		}
	}

	// The overlays are made now, outside the frozen window: libvirt then
	// only has to open them (REUSE_EXT), not create them through qemu. A
	// local-store volume's head gets its overlay from the store, which
	// stays the judge of which file is the head.
	kept := false
	defer func() {
		if !kept {
			for _, d := range plan {
				if d.head != nil {
					d.head.Abort()
				} else if d.overlay != "" {
					os.Remove(d.overlay)
				}
			}
		}
	}()
	if err := p.prepareHeads(ctx, plan, name, opts.Metadata); err != nil {
		return Record{}, fmt.Errorf("instance %q: %w", domain, err)
	}
	if err := createOverlays(dom, plan); err != nil {
		return Record{}, fmt.Errorf("instance %q: %w", domain, err)
	}

	requireQuiesce := (p.cfg.RequireQuiesce || opts.RequireQuiesce) && !opts.NoFreeze && !opts.Memory
	var f *frozen
	switch {
	case held != nil:
		f = held
	case running && !opts.Memory && !opts.NoFreeze:
		f, err = p.freeze(ctx, dom, domain, uuid)
		if err != nil {
			if requireQuiesce || !errors.Is(err, ErrAgent) {
				return Record{}, fmt.Errorf("instance %q: no quiesced snapshot: %w", domain, err)
			}
			rec.Why = "not frozen: " + err.Error()
			if f != nil {
				// Failed half-way, thawed since: part of the guest
				// may have been frozen this long.
				rec.Frozen = f.frozenFor()
				f = nil
			}
		}
	case opts.NoFreeze:
		rec.Why = "taken without freezing"
	case opts.Memory:
		rec.Why = "memory snapshot: the guest is not frozen, its memory is saved with the disks"
	case info.state == libvirt.DOMAIN_PAUSED:
		rec.Why = "the domain was paused"
	}
	if requireQuiesce && running && f == nil {
		return Record{}, fmt.Errorf("instance %q: no quiesced snapshot: %w", domain, &agentError{errors.New("the guest was not frozen")})
	}

	// From here until the thaw, every moment counts: the guest may be
	// frozen.
	if f != nil && testHookFrozen != nil {
		testHookFrozen()
	}
	tTake := time.Now()
	takeErr := p.take(ctx, dom, name, plan, skipped, rec.Memory, running, f != nil)
	tTaken := time.Now()
	var thawErr error
	if f != nil {
		if takeErr == nil {
			if ok, why := f.stillFrozen(dom); ok {
				rec.Consistency = snapshot.Quiesced
			} else {
				rec.Why = why
			}
		}
		tVerified := time.Now()
		if held == nil {
			thawErr = f.thaw(ctx)
			rec.Window = &Window{Freeze: f.ready.Sub(f.started), Snapshot: tTaken.Sub(tTake),
				Verify: tVerified.Sub(tTaken), Thaw: time.Since(tVerified)}
		}
		// For a held freeze, the thaw comes later and updates it.
		rec.Frozen = f.frozenFor()
	}
	if takeErr != nil {
		return Record{}, errors.Join(fmt.Errorf("instance %q: snapshot %q: %w", domain, name, takeErr), thawErr)
	}

	// qemu writes to the overlays now: they stay whatever happens next.
	kept = true
	var storeErr error
	for _, d := range plan {
		if d.head == nil {
			continue
		}
		if err := d.head.Commit(ctx, rec.Consistency); err != nil {
			// The store commits it when it is next opened: qemu
			// writes to the prepared head (see PrepareExternalHead).
			p.cfg.Logf("virt: instance %q: snapshot %q: disk %s: %v", domain, name, d.Device, err)
			storeErr = errors.Join(storeErr, fmt.Errorf("disk %s: the store did not record the snapshot: %w", d.Device, err))
		}
	}
	for _, d := range plan {
		dr := DiskRecord{Device: d.Device, Kind: d.Kind, Format: d.Format, Volume: d.Volume}
		switch d.Kind {
		case FileDisk:
			dr.Layer, dr.Overlay = d.Path, d.overlay
			if d.head != nil {
				// The store's files: the store removes them.
				dr.Store = true
			} else {
				recs.Created = append(recs.Created, d.overlay)
			}
		case RBDDisk:
			dr.Layer, dr.Pool, dr.Image = "rbd:"+d.Pool+"/"+d.Image+"@"+name, d.Pool, d.Image
		}
		rec.Disks = append(rec.Disks, dr)
	}
	if rec.Memory != "" {
		recs.Created = append(recs.Created, rec.Memory)
	}
	recs.Name = domain
	recs.Snapshots = append(recs.Snapshots, rec)
	if err := p.records.save(recs); err != nil {
		// The overlays exist and qemu writes to them: the chain is
		// sound, only the record of this snapshot is lost.
		return Record{}, fmt.Errorf("instance %q: snapshot %q taken but not recorded: %w", domain, name, errors.Join(err, storeErr))
	}
	if storeErr != nil {
		return Record{}, fmt.Errorf("instance %q: snapshot %q: %w", domain, name, storeErr)
	}
	if held != nil {
		held.mu.Lock()
		held.record = name
		held.mu.Unlock()
	}
	if requireQuiesce && f != nil && rec.Consistency != snapshot.Quiesced {
		// Refused after the fact: the freeze did not hold (the agent
		// died, the window ran out). Take the snapshot back out. A
		// paused or shut-off domain was never to be frozen (nothing
		// writes): its snapshot stands, as the check before the take
		// allows.
		derr := p.deleteLocked(ctx, dom, uuid, domain, name)
		return Record{}, errors.Join(fmt.Errorf("instance %q: no quiesced snapshot: %w", domain, &agentError{errors.New(rec.Why)}), derr)
	}
	return rec, thawErr
}

// plan lists the disks a snapshot takes, with a new overlay name for each
// file disk, and the devices it leaves out. A disk it should take but
// cannot is an error: a snapshot of some disks only would not be what the
// caller asked for.
func (p *Provider) plan(info *domainInfo, memory bool) (plan []plannedDisk, skipped []string, err error) {
	for _, d := range info.disks {
		if !d.Snapshot {
			if d.Kind == RBDDisk && strings.Contains(d.Why, "not mounted") {
				return nil, nil, fmt.Errorf("%w: instance %q: disk %s: %s", snapshot.ErrUnsupported, info.name, d.Device, d.Why)
			}
			skipped = append(skipped, d.Device)
			continue
		}
		pd := plannedDisk{Disk: d}
		switch d.Kind {
		case FileDisk:
			pd.overlay, err = newFileName(filepath.Dir(d.Path), overlayStem(d.Path), ".qcow2")
			if err != nil {
				return nil, nil, err
			}
		case RBDDisk:
			if memory {
				return nil, nil, fmt.Errorf("%w: instance %q: a memory snapshot cannot include RBD disk %s", snapshot.ErrUnsupported, info.name, d.Device)
			}
			pd.backend, _ = p.pool(d.Pool)
		default:
			return nil, nil, fmt.Errorf("%w: instance %q: disk %s (%s)", snapshot.ErrUnsupported, info.name, d.Device, d.Source)
		}
		plan = append(plan, pd)
	}
	if len(plan) == 0 {
		return nil, nil, fmt.Errorf("%w: instance %q has no disk to snapshot", snapshot.ErrInvalid, info.name)
	}
	if memory && firstFile(plan) == "" {
		return nil, nil, fmt.Errorf("%w: instance %q: a memory snapshot needs a file disk", snapshot.ErrUnsupported, info.name)
	}
	return plan, skipped, nil
}

// take snapshots the planned disks: the file disks in one libvirt
// transaction, the RBD disks through their backends. When the disks cannot
// be taken in one transaction (RBD disks, or RBD and file disks) and the
// guest is not frozen, a running domain is paused meanwhile, so that the
// snapshot is still crash-consistent. A domain paused already stays as its
// owner left it: suspending it again would succeed, and the resume after
// the snapshot would start it. On error, the RBD snapshots already made
// are deleted.
func (p *Provider) take(ctx context.Context, dom *libvirt.Domain, name string, plan []plannedDisk, skipped []string,
	memFile string, running, frozen bool) (err error) {
	overlays := map[string]string{}
	var rbd []plannedDisk
	for _, d := range plan {
		if d.Kind == FileDisk {
			overlays[d.Device] = d.overlay
		} else {
			rbd = append(rbd, d)
		}
	}
	groups := len(rbd)
	if len(overlays) > 0 {
		groups++
	}
	if running && !frozen && groups > 1 {
		if err := dom.Suspend(); err != nil {
			return wrap(err, "pause for a crash-consistent snapshot")
		}
		defer func() {
			if rerr := dom.Resume(); rerr != nil {
				err = errors.Join(err, wrap(rerr, "resume after the snapshot"))
			}
		}()
	}
	var made []plannedDisk
	defer func() {
		if err == nil {
			return
		}
		for _, d := range made {
			if derr := d.backend.DeleteSnapshot(context.WithoutCancel(ctx), d.Image, name); derr != nil {
				err = errors.Join(err, fmt.Errorf("undo the snapshot of %s: %w", d.Device, derr))
			}
		}
	}()
	for _, d := range rbd {
		if _, err := d.backend.CreateSnapshots(ctx, []string{d.Image}, name, snapshot.SnapshotOptions{}); err != nil {
			return fmt.Errorf("disk %s (rbd:%s/%s): %w", d.Device, d.Pool, d.Image, err)
		}
		made = append(made, d)
	}
	if len(overlays) == 0 {
		return nil
	}
	flags := libvirt.DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.DOMAIN_SNAPSHOT_CREATE_ATOMIC |
		libvirt.DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
	if memFile == "" {
		flags |= libvirt.DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
	}
	// Disks libvirt would take by default (RBD ones, taken above) must be
	// left out by name.
	others := slices.Clone(skipped)
	for _, d := range rbd {
		others = append(others, d.Device)
	}
	doc := snapshotXML("snapfs-"+randomHex(), overlays, others, memFile)
	snap, err := dom.CreateSnapshotXML(doc, flags)
	if err != nil {
		return wrap(err, "libvirt snapshot")
	}
	snap.Free()
	return nil
}

// createOverlays creates the new overlay of each file disk of a plan: an
// empty qcow2 file of the disk's virtual size whose backing file is the
// disk's active file (by absolute name, with its format), as libvirt would
// make it. On error, the files made are removed.
func createOverlays(dom *libvirt.Domain, plan []plannedDisk) (err error) {
	var made []string
	defer func() {
		if err != nil {
			for _, f := range made {
				os.Remove(f)
			}
		}
	}()
	for _, d := range plan {
		if d.Kind != FileDisk || d.head != nil {
			continue
		}
		info, err := dom.GetBlockInfo(d.Device, 0)
		if err != nil {
			return wrap(err, fmt.Sprintf("disk %s: size", d.Device))
		}
		format := d.Format
		if format == "" {
			format = "raw"
		}
		f, err := os.OpenFile(d.overlay, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Device, err)
		}
		made = append(made, d.overlay)
		err = qcow.CreateOverlay(f, int64(info.Capacity), 0, d.Path, format)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("disk %s: overlay %s: %w", d.Device, d.overlay, err)
		}
	}
	return nil
}

// prepareHeads asks the store for the new overlay of each file disk of a
// plan that is a local-store volume's head (Config.Store): the store makes
// it, in its own directory, and commits the switch once libvirt made it.
func (p *Provider) prepareHeads(ctx context.Context, plan []plannedDisk, name string, meta map[string]string) error {
	if p.cfg.Store == nil {
		return nil
	}
	for i := range plan {
		d := &plan[i]
		if d.Kind != FileDisk || d.Volume == "" {
			continue
		}
		if d.Format != "qcow2" {
			return fmt.Errorf("%w: disk %s: volume %q is qcow2, the domain reads it as %q", snapshot.ErrInvalid, d.Device, d.Volume, d.Format)
		}
		h, err := p.cfg.Store.PrepareExternalHead(ctx, d.Path, name, snapshot.SnapshotOptions{Metadata: meta})
		if errors.Is(err, snapshot.ErrNotFound) {
			continue // no longer a head: an ordinary file disk
		}
		if err != nil {
			return fmt.Errorf("disk %s (volume %q): %w", d.Device, d.Volume, err)
		}
		d.head, d.overlay = h, h.Path
	}
	return nil
}

// firstFile returns the active file of the first file disk of a plan.
func firstFile(plan []plannedDisk) string {
	for _, d := range plan {
		if d.Kind == FileDisk {
			return d.Path
		}
	}
	return ""
}

// setFrozen writes the frozen window into a record once the thaw is done
// (the generic path: Manager thaws after CreateInstanceSnapshot returned).
func (p *Provider) setFrozen(uuid, name string, frozenFor time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	release, err := p.lockDomain(ctx, uuid)
	if err != nil {
		p.cfg.Logf("virt: record the frozen window of %q: %v", name, err)
		return
	}
	defer release()
	recs, err := p.records.load(uuid)
	if err == nil {
		if i := recs.find(name); i >= 0 {
			recs.Snapshots[i].Frozen = frozenFor
			err = p.records.save(recs)
		}
	}
	if err != nil {
		p.cfg.Logf("virt: record the frozen window of %q: %v", name, err)
	}
}
