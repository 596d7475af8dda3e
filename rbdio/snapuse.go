//go:build ceph && cgo

package rbdio

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/ceph/go-ceph/rbd"
)

// An image opened at a snapshot keeps reading the snapshot's bytes when the
// snapshot is deleted (as snapshot.Backend promises, and as the local
// store's open files do): rbd snap rm would let the OSDs trim the
// snapshot's objects under the reader. So a snapshot that images of this
// process have open is only renamed to a hidden name (no snapshot name may
// start with '.', so ListSnapshots skips it) and removed when the last of
// them closes. Readers in other processes are not seen: they rely on
// snapshot.Manager holds in the mount.
//
// A process that hides a snapshot keeps its image open read-write (a
// watcher, as rbd status shows) until it removes it. So a hidden snapshot
// of an image that no other client has open was left by a process that
// died: the next snapshot delete on the image removes it (sweepHidden).

// hiddenPrefix starts the names of deleted snapshots still open here.
const hiddenPrefix = ".snapfs-deleted-"

// snapUse names a snapshot of a volume by id: ids are never reused.
type snapUse struct {
	volume string
	id     uint64
}

// hiddenSnap is a snapshot deleted while open here: its hidden name, and
// the image held open read-write until it is removed.
type hiddenSnap struct {
	name   string
	holder *rbd.Image
}

// useSnap counts img, opened at snapshot snap of volume, as a user of the
// snapshot, and returns the function that closes img and, for the last
// user of a deleted snapshot, removes it.
func (p *Pool) useSnap(img *rbd.Image, volume, snap string) (release func() error, err error) {
	id, err := img.GetSnapID(snap)
	if err != nil {
		return nil, wrap("snap info "+p.spec(volume)+"@"+snap, err)
	}
	k := snapUse{volume, id}
	p.useMu.Lock()
	if p.users == nil {
		p.users, p.doomed = map[snapUse]int{}, map[snapUse]hiddenSnap{}
	}
	p.users[k]++
	p.useMu.Unlock()
	return func() error {
		err := img.Close()
		p.useMu.Lock()
		p.users[k]--
		hidden, doomed := p.doomed[k]
		last := p.users[k] == 0
		if last {
			delete(p.users, k)
			delete(p.doomed, k)
		}
		p.useMu.Unlock()
		if last && doomed {
			p.removeHidden(volume, hidden)
		}
		return err
	}, nil
}

// hiddenHere says whether snapshot id of volume was hidden by this
// process.
func (p *Pool) hiddenHere(volume string, id uint64) bool {
	p.useMu.Lock()
	defer p.useMu.Unlock()
	_, ok := p.doomed[snapUse{volume, id}]
	return ok
}

// deferRemoval hides snapshot name (id sid) of img instead of removing it
// when images of this process have it open, and says whether it did.
func (p *Pool) deferRemoval(img *rbd.Image, volume, name string, sid uint64) (bool, error) {
	k := snapUse{volume, sid}
	p.useMu.Lock()
	defer p.useMu.Unlock()
	if p.users[k] == 0 {
		return false, nil
	}
	// The holder first: from the rename on, another process's
	// sweepHidden must see that the hidden snapshot has an owner.
	holder, err := p.openImage(volume, "", true)
	if err != nil {
		return false, err
	}
	hidden := hiddenPrefix + strconv.FormatUint(sid, 10)
	if err := img.GetSnapshot(name).Rename(hidden); err != nil {
		holder.Close()
		return false, wrap(fmt.Sprintf("snap rename %s@%s", p.spec(volume), name), err)
	}
	p.doomed[k] = hiddenSnap{name: hidden, holder: holder}
	return true, nil
}

// removeHidden removes a hidden snapshot once its last reader here has
// closed, and lets its image go. Best effort: one left behind (an error)
// is removed by a later sweepHidden.
func (p *Pool) removeHidden(volume string, h hiddenSnap) {
	defer h.holder.Close()
	release, err := p.lockVolumes(context.Background(), volume)
	if err != nil {
		return
	}
	defer release()
	p.removeSnap(h.holder, volume, h.name)
}

// sweepHidden removes the hidden snapshots of img (volume, open read-write
// under the volume's lock) that a process which died left: those not
// hidden here, when no other client has the image open. Best effort.
func (p *Pool) sweepHidden(img *rbd.Image, volume string) {
	snaps, err := listSnaps(img)
	if err != nil {
		return
	}
	var orphans []string
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, hiddenPrefix) && !p.hiddenHere(volume, s.Id) {
			orphans = append(orphans, s.Name)
		}
	}
	if len(orphans) == 0 {
		return
	}
	if others, err := p.foreignWatchers(img); err != nil || len(others) > 0 {
		return
	}
	for _, name := range orphans {
		p.removeSnap(img, volume, name)
	}
}
