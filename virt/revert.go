//go:build libvirt && cgo

package virt

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"libvirt.org/go/libvirt"

	"snapfs/qcow"
	"snapfs/snapshot"
)

// Revert makes a shut-off domain's disks read as snapshot name again: each
// file disk gets a new, empty overlay over the snapshot's layer (the
// snapshot itself is not touched, and can be reverted to again), each RBD
// disk is reverted through its pool's backend, and the domain's definition
// is changed to use them. What the disks held since is dropped (the files
// snapfs made; a file it did not make is left where it is). A memory
// snapshot also restores the domain, running, from its saved memory.
//
// ErrBusy when the domain is not shut off: stop it first (virsh destroy or
// shutdown).
func (p *Provider) Revert(ctx context.Context, instance, name string) error {
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
	recs, err := p.records.load(uuid)
	if err != nil {
		return err
	}
	i := recs.find(name)
	if i < 0 || recs.Snapshots[i].Deleting {
		return fmt.Errorf("%w: snapshot %q of instance %q", snapshot.ErrNotFound, name, instance)
	}
	rec := recs.Snapshots[i]
	info, err := p.describe(dom)
	if err != nil {
		return err
	}
	if info.state != libvirt.DOMAIN_SHUTOFF {
		return fmt.Errorf("%w: instance %q is %s; shut it off before a revert", snapshot.ErrBusy, instance, stateName(info.state))
	}
	current := map[string]string{}
	for _, d := range info.disks {
		if d.Kind == FileDisk {
			current[d.Device] = d.Path
		}
	}

	newSources := map[string]diskFile{}
	var made []string
	defer func() {
		// Until they are recorded, the new overlays are ours to remove.
		for _, f := range made {
			os.Remove(f)
		}
	}()
	for _, d := range rec.Disks {
		switch {
		case d.Kind == FileDisk && d.Store:
			// The store reverts its volume (a new head), and the
			// domain is pointed at that head.
			if p.cfg.Store == nil {
				return fmt.Errorf("%w: instance %q: disk %s is volume %q of a local store that is not open",
					snapshot.ErrUnsupported, instance, d.Device, d.Volume)
			}
			if err := p.cfg.Store.Revert(ctx, d.Volume, name); err != nil {
				return fmt.Errorf("instance %q: revert disk %s: %w", instance, d.Device, err)
			}
			v, err := p.cfg.Store.Volume(ctx, d.Volume)
			if err != nil {
				return fmt.Errorf("instance %q: revert disk %s: %w", instance, d.Device, err)
			}
			newSources[d.Device] = diskFile{v.HeadPath, "qcow2"}
		case d.Kind == FileDisk:
			if _, ok := current[d.Device]; !ok {
				return fmt.Errorf("%w: instance %q has no file disk %s any more", snapshot.ErrNotFound, instance, d.Device)
			}
			overlay, err := newOverlay(d.Layer, d.Format)
			if err != nil {
				return fmt.Errorf("instance %q: revert disk %s: %w", instance, d.Device, err)
			}
			made = append(made, overlay)
			newSources[d.Device] = diskFile{overlay, "qcow2"}
		case d.Kind == RBDDisk:
			backend, ok := p.pool(d.Pool)
			if !ok {
				return fmt.Errorf("%w: RBD pool %q of disk %s is not mounted", snapshot.ErrUnsupported, d.Pool, d.Device)
			}
			r, ok := backend.(snapshot.Reverter)
			if !ok {
				return fmt.Errorf("%w: the backend of RBD pool %q cannot revert", snapshot.ErrUnsupported, d.Pool)
			}
			if err := r.Revert(ctx, d.Image, name); err != nil {
				return fmt.Errorf("instance %q: revert disk %s: %w", instance, d.Device, err)
			}
		}
	}
	if len(newSources) > 0 {
		if err := p.defineSources(dom, newSources); err != nil {
			return fmt.Errorf("instance %q: revert: %w", instance, err)
		}
	}
	// The domain uses the new overlays now: record them as ours.
	recs.Created = append(recs.Created, made...)
	made = nil
	var drop []string
	for dev := range newSources {
		old := current[dev]
		if recs.ours(old) && !isLayer(recs, old) {
			drop = append(drop, old)
			recs.forget(old)
		}
	}
	if err := p.records.save(recs); err != nil {
		return err
	}
	for _, f := range drop {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.cfg.Logf("virt: remove %s: %v", f, err)
		}
	}
	if rec.Memory == "" {
		return nil
	}
	conn, err := p.connection()
	if err != nil {
		return err
	}
	dxml, err := conn.DomainSaveImageGetXMLDesc(rec.Memory, libvirt.DOMAIN_SAVE_IMAGE_XML_SECURE)
	if err != nil {
		return wrap(err, fmt.Sprintf("instance %q: revert: memory state %s", instance, rec.Memory))
	}
	if dxml, err = rewriteDiskSources(dxml, newSources); err != nil {
		return fmt.Errorf("instance %q: revert: %w", instance, err)
	}
	if err := conn.DomainRestoreFlags(rec.Memory, dxml, libvirt.DOMAIN_SAVE_RUNNING); err != nil {
		return wrap(err, fmt.Sprintf("instance %q: revert: restore the memory state", instance))
	}
	return nil
}

// isLayer says whether some snapshot holds file as a layer.
func isLayer(recs *domainRecords, file string) bool {
	return slices.ContainsFunc(recs.Snapshots, func(r Record) bool {
		return slices.ContainsFunc(r.Disks, func(d DiskRecord) bool { return d.Layer == file })
	})
}

// newOverlay creates an empty qcow2 overlay over layer, next to it.
func newOverlay(layer, format string) (string, error) {
	img, err := qcow.OpenPath(layer, qcow.Options{})
	if err != nil {
		return "", err
	}
	size := img.Size()
	img.Close()
	if format == "" {
		format = "qcow2"
	}
	path, err := newFileName(filepath.Dir(layer), overlayStem(layer), ".qcow2")
	if err != nil {
		return "", err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", err
	}
	err = qcow.CreateOverlay(f, size, 0, layer, format)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", err
	}
	return path, nil
}

// defineSources changes the persistent definition of a domain to use the
// given files (by device).
func (p *Provider) defineSources(dom *libvirt.Domain, files map[string]diskFile) error {
	doc, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE | libvirt.DOMAIN_XML_SECURE)
	if err != nil {
		return wrap(err, "domain XML")
	}
	doc, err = rewriteDiskSources(doc, files)
	if err != nil {
		return err
	}
	conn, err := p.connection()
	if err != nil {
		return err
	}
	nd, err := conn.DomainDefineXML(doc)
	if err != nil {
		return wrap(err, "define")
	}
	nd.Free()
	return nil
}
