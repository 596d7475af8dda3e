package snapshot

import "context"

// VolumeInfo is a volume as people and scripts see it: the model's Volume
// and the names of its snapshots, oldest first. It is volumes/VOL/info.json
// in the mount and each entry of `snapfs volume list --json`, so that a
// script reads the same document from either.
type VolumeInfo struct {
	Volume
	Snapshots []string `json:"snapshots"`
	// Latest is the newest snapshot, where volumes/VOL/snapshots/latest
	// points; empty when there is none.
	Latest string `json:"latest,omitempty"`
}

// VolumeInfoFor returns the VolumeInfo of volume v of b.
func VolumeInfoFor(ctx context.Context, b Backend, v Volume) (VolumeInfo, error) {
	snaps, err := b.ListSnapshots(ctx, v.Name)
	if err != nil {
		return VolumeInfo{}, err
	}
	info := VolumeInfo{Volume: v, Snapshots: []string{}}
	for _, s := range snaps {
		info.Snapshots = append(info.Snapshots, s.Name)
		info.Latest = s.Name
	}
	return info, nil
}
