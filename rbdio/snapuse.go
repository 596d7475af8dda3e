//go:build ceph && cgo

package rbdio

import (
	"context"
	"fmt"
	"strconv"

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

// hiddenPrefix starts the names of deleted snapshots still open here.
const hiddenPrefix = ".snapfs-deleted-"

// snapUse names a snapshot of a volume by id: ids are never reused.
type snapUse struct {
	volume string
	id     uint64
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
		p.users, p.doomed = map[snapUse]int{}, map[snapUse]string{}
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

// deferRemoval hides snapshot name (id sid) of img instead of removing it
// when images of this process have it open, and says whether it did.
func (p *Pool) deferRemoval(img *rbd.Image, volume, name string, sid uint64) (bool, error) {
	k := snapUse{volume, sid}
	p.useMu.Lock()
	defer p.useMu.Unlock()
	if p.users[k] == 0 {
		return false, nil
	}
	hidden := hiddenPrefix + strconv.FormatUint(sid, 10)
	if err := img.GetSnapshot(name).Rename(hidden); err != nil {
		return false, wrap(fmt.Sprintf("snap rename %s@%s", p.spec(volume), name), err)
	}
	p.doomed[k] = hidden
	return true, nil
}

// removeHidden removes a hidden snapshot once its last reader here has
// closed. Best effort: one left behind (an error, a crash) takes space but
// shows nowhere.
func (p *Pool) removeHidden(volume, hidden string) {
	release, err := p.lockVolumes(context.Background(), volume)
	if err != nil {
		return
	}
	defer release()
	img, err := p.openImage(volume, "", true)
	if err != nil {
		return
	}
	defer img.Close()
	p.removeSnap(img, volume, hidden)
}
