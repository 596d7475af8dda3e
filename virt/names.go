package virt

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// overlaySuffix matches what newFileName adds to a stem, so that overlays
// of overlays keep the disk's first name.
var overlaySuffix = regexp.MustCompile(`\.snapfs-[0-9a-f]{8}$`)

// overlayStem returns the name of a disk file without its extension and
// without what earlier snapshots added to it.
func overlayStem(path string) string {
	base := filepath.Base(path)
	base = strings.TrimSuffix(base, filepath.Ext(base))
	return overlaySuffix.ReplaceAllString(base, "")
}

// newFileName returns dir/stem.snapfs-XXXXXXXX.ext, a name no file has.
func newFileName(dir, stem, ext string) (string, error) {
	for range 16 {
		p := filepath.Join(dir, stem+".snapfs-"+randomHex()+ext)
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			return p, nil
		}
	}
	return "", fmt.Errorf("no free file name in %s", dir)
}

// randomHex returns 8 random hex digits.
func randomHex() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
