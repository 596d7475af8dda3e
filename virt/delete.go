//go:build libvirt && cgo

package virt

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"libvirt.org/go/libvirt"

	"snapfs/snapshot"
)

// DeleteInstanceSnapshot implements [snapshot.InstanceProvider]: it merges
// each disk's layer with its child and drops the record.
//
// For a file disk whose layer L has one child C (the next snapshot's layer,
// or the file qemu writes to), C's data is committed into L, and L takes
// C's place: later snapshots and the running disk read exactly as before,
// and C is removed. On a running domain that is a libvirt block commit
// (with a pivot when C is the active file), done by qemu itself, so no disk
// changes under it; on a shut-off domain, qemu-img commit and rebase. A
// layer with several children (after a revert to an earlier snapshot) is
// refused with ErrBusy: delete the snapshots of the other branch first.
//
// The delete is marked in the record first and its progress recorded per
// disk, so that after a crash the snapshot stays hidden and a new delete
// finishes it.
func (p *Provider) DeleteInstanceSnapshot(ctx context.Context, instance, name string) error {
	dom, uuid, err := p.lookup(instance)
	if err != nil {
		return err
	}
	defer dom.Free()
	release, err := p.lockDomain(ctx, uuid)
	if err != nil {
		return err
	}
	defer release()
	return p.deleteLocked(ctx, dom, uuid, instance, name)
}

// deleteLocked is DeleteInstanceSnapshot under the domain lock.
func (p *Provider) deleteLocked(ctx context.Context, dom *libvirt.Domain, uuid, instance, name string) error {
	recs, err := p.records.load(uuid)
	if err != nil {
		return err
	}
	i := recs.find(name)
	if i < 0 {
		return fmt.Errorf("%w: snapshot %q of instance %q", snapshot.ErrNotFound, name, instance)
	}
	if !recs.Snapshots[i].Deleting {
		// Refuse what cannot be done before the snapshot is marked (and
		// so hidden): a layer with several children.
		actives, _, err := p.activeFiles(dom)
		if err != nil {
			return err
		}
		if err := p.storeDeletable(dom, instance, recs.Snapshots[i]); err != nil {
			return err
		}
		for _, d := range recs.Snapshots[i].Disks {
			if d.Kind != FileDisk || d.Merged || d.Store {
				continue
			}
			children, _, err := layerChildren(recs, i, d.Device, actives[d.Device])
			if err != nil {
				return err
			}
			if len(children) > 1 {
				return fmt.Errorf("%w: instance %q: snapshot %q: disk %s: layer %s has %d children (%s) after a revert; delete the snapshots of one branch first",
					snapshot.ErrBusy, instance, name, d.Device, d.Layer, len(children), strings.Join(children, ", "))
			}
		}
		recs.Snapshots[i].Deleting = true
		if err := p.records.save(recs); err != nil {
			return err
		}
	}
	for _, dev := range deviceNames(recs.Snapshots[i].Disks) {
		if err := ctx.Err(); err != nil {
			return err
		}
		d := recs.Snapshots[i].disk(dev)
		if d.Merged {
			continue
		}
		switch {
		case d.Kind == FileDisk && d.Store:
			if p.cfg.Store == nil {
				return fmt.Errorf("%w: instance %q: delete snapshot %q: disk %s is volume %q of a local store that is not open",
					snapshot.ErrUnsupported, instance, name, dev, d.Volume)
			}
			if err := p.cfg.Store.DeleteSnapshot(ctx, d.Volume, name); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
				return fmt.Errorf("instance %q: delete snapshot %q: disk %s: %w", instance, name, dev, err)
			}
			// The store changed the chain under the disk's file: the
			// definition must not name the old one (<backingStore>).
			if err := p.forgetBacking(dom, dev); err != nil {
				return fmt.Errorf("instance %q: delete snapshot %q: disk %s: %w", instance, name, dev, err)
			}
			d.Merged = true
			if err := p.records.save(recs); err != nil {
				return err
			}
		case d.Kind == FileDisk:
			if err := p.mergeLayer(ctx, dom, recs, i, dev); err != nil {
				return fmt.Errorf("instance %q: delete snapshot %q: disk %s: %w", instance, name, dev, err)
			}
		case d.Kind == RBDDisk:
			backend, ok := p.pool(d.Pool)
			if !ok {
				return fmt.Errorf("%w: instance %q: delete snapshot %q: RBD pool %q of disk %s is not mounted",
					snapshot.ErrUnsupported, instance, name, d.Pool, dev)
			}
			if err := backend.DeleteSnapshot(ctx, d.Image, name); err != nil && !errors.Is(err, snapshot.ErrNotFound) {
				return fmt.Errorf("instance %q: delete snapshot %q: disk %s: %w", instance, name, dev, err)
			}
			d.Merged = true
			if err := p.records.save(recs); err != nil {
				return err
			}
		}
	}
	rec := recs.Snapshots[i]
	recs.Snapshots = slices.Delete(recs.Snapshots, i, i+1)
	var remove []string
	if rec.Memory != "" && recs.ours(rec.Memory) {
		remove = append(remove, rec.Memory)
		recs.forget(rec.Memory)
	}
	if err := p.records.save(recs); err != nil {
		return err
	}
	for _, f := range remove {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.cfg.Logf("virt: remove %s: %v", f, err)
		}
	}
	return nil
}

// storeDeletable refuses (ErrBusy, with a log line) to delete a snapshot
// of a running domain that holds a local-store volume's layer: the store
// deletes a snapshot by merging files itself, and the layer above it may
// be the head qemu writes to; a libvirt block commit would change the
// store's files behind its back. Shut off, the store deletes it.
func (p *Provider) storeDeletable(dom *libvirt.Domain, instance string, rec Record) error {
	active, err := dom.IsActive()
	if err != nil {
		return wrap(err, "domain state")
	}
	if !active {
		return nil
	}
	for _, d := range rec.Disks {
		if d.Kind == FileDisk && d.Store && !d.Merged {
			err := fmt.Errorf("%w: instance %q is running: snapshot %q of disk %s is snapshot %q of local-store volume %q; shut the domain off to delete it",
				snapshot.ErrBusy, instance, rec.Name, d.Device, rec.Name, d.Volume)
			p.cfg.Logf("virt: %v", err)
			return err
		}
	}
	return nil
}

// deviceNames returns the devices of a snapshot's disks.
func deviceNames(disks []DiskRecord) []string {
	var out []string
	for _, d := range disks {
		out = append(out, d.Device)
	}
	return out
}

// mergeLayer merges the layer of disk dev of snapshot i with its child, and
// records it (Merged) with every record that named the child now naming
// the layer.
func (p *Provider) mergeLayer(ctx context.Context, dom *libvirt.Domain, recs *domainRecords, i int, dev string) error {
	d := recs.Snapshots[i].disk(dev)
	layer := d.Layer
	actives, live, err := p.activeFiles(dom)
	if err != nil {
		return err
	}
	active := actives[dev]
	children, candidates, err := layerChildren(recs, i, dev, active)
	if err != nil {
		return err
	}

	switch len(children) {
	case 0:
		// Nothing reads through the layer any more (a revert left it
		// behind): it goes if it is ours.
		if recs.ours(layer) && layer != active {
			if err := os.Remove(layer); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			recs.forget(layer)
		}
	case 1:
		child := children[0]
		if d.Child == "" {
			d.Child = child
			if err := p.records.save(recs); err != nil {
				return err
			}
		}
		var activeChain []string
		if active != "" {
			if activeChain, err = chainOf(active); err != nil {
				return err
			}
		}
		layerFormat := d.Format
		if layerFormat == "" {
			layerFormat = "qcow2"
		}
		if live && slices.Contains(activeChain, child) {
			if err := p.blockCommit(ctx, dom, dev, layer, layerFormat, child, child == active); err != nil {
				return err
			}
		} else if _, err := os.Stat(child); err == nil {
			if err := p.offlineCommit(ctx, dom, dev, layer, layerFormat, child, candidates, child == active); err != nil {
				return err
			}
		}
		// The child is out of every chain: the layer holds what it held.
		for j := range recs.Snapshots {
			if o := recs.Snapshots[j].disk(dev); o != nil && o.Layer == child {
				o.Layer, o.Format = layer, layerFormat
			}
		}
		if recs.ours(child) {
			if err := os.Remove(child); err != nil && !errors.Is(err, fs.ErrNotExist) {
				p.cfg.Logf("virt: remove %s: %v", child, err)
			}
			recs.forget(child)
		}
	default:
		return fmt.Errorf("%w: layer %s has %d children (%s) after a revert; delete the snapshots of one branch first",
			snapshot.ErrBusy, layer, len(children), strings.Join(children, ", "))
	}
	d.Merged = true
	return p.records.save(recs)
}

// layerChildren returns the files that sit on the layer of disk dev of
// snapshot i (its children), among the candidates: every other snapshot's
// layer of the device, and the active file. A delete that crashed after
// its commit is finished with the child it recorded (Child), which may no
// longer back onto the layer if the commit moved its own children there.
func layerChildren(recs *domainRecords, i int, dev, active string) (children, candidates []string, err error) {
	d := recs.Snapshots[i].disk(dev)
	layer := d.Layer
	if active != "" {
		candidates = append(candidates, active)
	}
	for j, r := range recs.Snapshots {
		if j != i {
			if o := r.disk(dev); o != nil && o.Kind == FileDisk && !slices.Contains(candidates, o.Layer) {
				candidates = append(candidates, o.Layer)
			}
		}
	}
	for _, c := range candidates {
		if c == layer {
			continue
		}
		b, err := backingFile(c)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		if b == layer {
			children = append(children, c)
		}
	}
	if d.Child != "" {
		return []string{d.Child}, candidates, nil
	}
	slices.Sort(children)
	return slices.Compact(children), candidates, nil
}

// activeFiles returns the file each file disk of a domain uses, and
// whether the domain is running (or paused: qemu has the files open).
func (p *Provider) activeFiles(dom *libvirt.Domain) (map[string]string, bool, error) {
	info, err := p.describe(dom)
	if err != nil {
		return nil, false, err
	}
	active := map[string]string{}
	for _, d := range info.disks {
		if d.Kind == FileDisk {
			active[d.Device] = d.Path
		}
	}
	return active, info.state != libvirt.DOMAIN_SHUTOFF, nil
}

// blockCommit commits top (active: the active file) into base on the
// running domain, waits for the job, and pivots an active commit to base.
// On a done context the job is aborted.
func (p *Provider) blockCommit(ctx context.Context, dom *libvirt.Domain, dev, base, baseFormat, top string, active bool) error {
	var flags libvirt.DomainBlockCommitFlags
	if active {
		flags |= libvirt.DOMAIN_BLOCK_COMMIT_ACTIVE
	}
	if err := dom.BlockCommit(dev, base, top, 0, flags); err != nil {
		return wrap(err, fmt.Sprintf("block commit %s into %s", top, base))
	}
	pivoted := false
	for {
		select {
		case <-ctx.Done():
			dom.BlockJobAbort(dev, 0)
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		info, err := dom.GetBlockJobInfo(dev, 0)
		if err != nil {
			return wrap(err, "block commit")
		}
		if info.Type == 0 { // no job any more
			break
		}
		if active && !pivoted && info.End > 0 && info.Cur == info.End {
			// Ready: both files hold the same; switch qemu to base.
			// "Not ready" is an OPERATION_INVALID: poll again.
			if err := dom.BlockJobAbort(dev, libvirt.DOMAIN_BLOCK_JOB_ABORT_PIVOT); err == nil {
				pivoted = true
			} else if !isCode(err, libvirt.ERR_OPERATION_INVALID) {
				return wrap(err, "block commit pivot")
			}
		}
	}
	// The job is gone, which it also is when it failed: check the chain.
	xmlDoc, err := dom.GetXMLDesc(0)
	if err != nil {
		return wrap(err, "block commit")
	}
	_, disks, err := parseDomainXML(xmlDoc)
	if err != nil {
		return err
	}
	for _, d := range disks {
		if d.Device != dev {
			continue
		}
		chain, err := chainOf(d.Path)
		if err != nil {
			return err
		}
		if slices.Contains(chain, top) || !slices.Contains(chain, base) {
			return fmt.Errorf("block commit of %s into %s did not complete (the chain is %s); see the libvirt log",
				top, base, strings.Join(chain, " -> "))
		}
		if active && d.Path != base {
			return fmt.Errorf("block commit of %s into %s: qemu did not pivot (it writes to %s)", top, base, d.Path)
		}
		if active {
			// libvirt pivots the live disk; make sure the definition the
			// domain boots from next follows.
			return p.redefineSource(dom, dev, diskFile{base, baseFormat})
		}
		return nil
	}
	return fmt.Errorf("%w: disk %s disappeared during the block commit", snapshot.ErrNotFound, dev)
}

// offlineCommit merges child into layer with qemu-img while qemu does not
// use them: child's data is committed into layer, the files that sat on
// child are rebased onto layer (their content is unchanged: layer now
// reads as child did), and a domain that used child as its disk uses layer.
func (p *Provider) offlineCommit(ctx context.Context, dom *libvirt.Domain, dev, layer, layerFormat, child string,
	candidates []string, childIsActive bool) error {
	if err := p.qemuImg(ctx, "commit", "-q", "-d", "-f", "qcow2", "-b", layer, child); err != nil {
		return err
	}
	for _, c := range candidates {
		if c == child || c == layer {
			continue
		}
		b, err := backingFile(c)
		if err != nil || b != child {
			continue
		}
		if err := p.qemuImg(ctx, "rebase", "-q", "-u", "-f", "qcow2", "-F", layerFormat, "-b", layer, c); err != nil {
			return err
		}
	}
	if childIsActive {
		return p.redefineSource(dom, dev, diskFile{layer, layerFormat})
	}
	return nil
}

// forgetBacking drops the <backingStore> of disk dev from the persistent
// definition of a domain, so that libvirt reads the chain from the files
// when it next starts it (a no-op for transient domains).
func (p *Provider) forgetBacking(dom *libvirt.Domain, dev string) error {
	return p.redefineDisk(dom, dev, func(d Disk) (diskFile, bool) { return diskFile{d.Path, d.Format}, true })
}

// redefineSource makes the persistent definition of a domain use file for
// disk dev (a no-op for transient domains and when it does already).
func (p *Provider) redefineSource(dom *libvirt.Domain, dev string, file diskFile) error {
	return p.redefineDisk(dom, dev, func(d Disk) (diskFile, bool) { return file, d.Path != file.Path })
}

// redefineDisk defines a persistent domain again with disk dev's source
// set to what source returns for the disk as defined now, and its
// <backingStore> dropped, when source says to (a no-op for transient
// domains).
func (p *Provider) redefineDisk(dom *libvirt.Domain, dev string, source func(Disk) (diskFile, bool)) error {
	persistent, err := dom.IsPersistent()
	if err != nil || !persistent {
		return wrap(err, "redefine")
	}
	doc, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE | libvirt.DOMAIN_XML_SECURE)
	if err != nil {
		return wrap(err, "redefine")
	}
	_, disks, err := parseDomainXML(doc)
	if err != nil {
		return err
	}
	for _, d := range disks {
		if d.Device == dev {
			if file, change := source(d); change {
				return p.defineSources(dom, map[string]diskFile{dev: file})
			}
			return nil
		}
	}
	return nil
}

// qemuImg runs qemu-img with args; the error carries its stderr.
func (p *Provider) qemuImg(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, p.cfg.QemuImg, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", p.cfg.QemuImg, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
