package snapshot

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxNameLen is the longest name, in bytes, of a volume, snapshot or
// instance: NAME_MAX, because every name becomes a directory in the mount.
const MaxNameLen = 255

// LatestName is the symlink that points at a volume's newest snapshot in the
// mount (volumes/V/snapshots/latest): no snapshot may take it.
const LatestName = "latest"

// CheckVolumeName returns an error wrapping ErrInvalidName unless name can
// name a volume. On top of the common rules (see checkName), '@' is
// reserved: "VOL@SNAP" names a snapshot on the command line, as in rbd.
func CheckVolumeName(name string) error {
	if err := checkName("volume", name); err != nil {
		return err
	}
	if strings.Contains(name, "@") {
		return fmt.Errorf("%w: volume name %q: '@' is reserved (VOL@SNAP names a snapshot)", ErrInvalidName, name)
	}
	return nil
}

// CheckSnapshotName returns an error wrapping ErrInvalidName unless name can
// name a snapshot; "latest" is taken by the mount's symlink to the newest.
func CheckSnapshotName(name string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	if name == LatestName {
		return fmt.Errorf("%w: snapshot name %q is reserved for the link to the newest snapshot", ErrInvalidName, name)
	}
	return nil
}

// maxNewSnapshotNameLen is the longest name of a snapshot taken now:
// every later snapshot of the volume shows it as since/NAME.qcow2, a file
// name that must fit in NAME_MAX too.
const maxNewSnapshotNameLen = MaxNameLen - len(".qcow2")

// CheckNewSnapshotName is CheckSnapshotName for a snapshot about to be
// taken or restored, which may be at most 249 bytes long (see
// maxNewSnapshotNameLen). Names already stored are checked with
// CheckSnapshotName, so that a store holding a longer one still opens.
func CheckNewSnapshotName(name string) error {
	if err := CheckSnapshotName(name); err != nil {
		return err
	}
	if len(name) > maxNewSnapshotNameLen {
		return fmt.Errorf("%w: snapshot name is %d bytes long; at most %d, so that since/NAME.qcow2 of later snapshots fits in a file name",
			ErrInvalidName, len(name), maxNewSnapshotNameLen)
	}
	return nil
}

// CheckInstanceName returns an error wrapping ErrInvalidName unless name can
// name an instance.
func CheckInstanceName(name string) error { return checkName("instance", name) }

// CheckDeviceName returns an error wrapping ErrInvalidName unless name is a
// plausible guest device name (vda, sdb, nvme0n1, hdc): letters, digits,
// '_' and '-', at most 32 bytes. Device names become file names in the mount
// (vda.raw), so they are held to a narrow alphabet.
func CheckDeviceName(name string) error {
	if name == "" || len(name) > 32 {
		return fmt.Errorf("%w: device name %q: want 1 to 32 characters", ErrInvalidName, name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return fmt.Errorf("%w: device name %q: only letters, digits, '_' and '-' (like vda)", ErrInvalidName, name)
		}
	}
	return nil
}

// checkName applies the rules common to every name: each becomes a
// directory in the mount, so it must be a valid, visible file name.
// Leading dots are refused too: ".x" would be hidden from ls, and the local
// store keeps its temporary files under such names.
func checkName(kind, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty %s name", ErrInvalidName, kind)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %s name is %d bytes long; at most %d", ErrInvalidName, kind, len(name), MaxNameLen)
	case strings.HasPrefix(name, "."):
		return fmt.Errorf("%w: %s name %q: names may not start with '.'", ErrInvalidName, kind, name)
	case strings.Contains(name, "/"):
		return fmt.Errorf("%w: %s name %q contains '/'", ErrInvalidName, kind, name)
	case !utf8.ValidString(name):
		return fmt.Errorf("%w: %s name %q is not valid UTF-8", ErrInvalidName, kind, name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return fmt.Errorf("%w: %s name %q contains a control character", ErrInvalidName, kind, name)
		}
	}
	return nil
}
