package qcow

import (
	"fmt"
	"path/filepath"
	"strings"
)

// DirOpener returns an Opener for local files that resolves a relative
// backing name against the directory of the file that names it, as QEMU
// does. Absolute names and names with "..", and protocol names such as
// "rbd:pool/img", are refused unless allowAny is set: an untrusted image must
// not make us read an arbitrary file.
func DirOpener(allowAny bool) Opener {
	return func(ref BackingRef) (File, error) {
		name := ref.Name
		if !allowAny {
			if filepath.IsAbs(name) || strings.Contains(name, ":") || hasDotDot(name) {
				return nil, fmt.Errorf("%w: %q of %q is outside its directory; refused", ErrBacking, name, ref.From)
			}
		}
		if !filepath.IsAbs(name) {
			name = filepath.Join(filepath.Dir(ref.From), name)
		}
		f, err := OpenFile(name)
		if err != nil {
			return nil, fmt.Errorf("%w %q of %q: %w", ErrBacking, ref.Name, ref.From, err)
		}
		return f, nil
	}
}

func hasDotDot(name string) bool {
	for _, part := range strings.Split(filepath.ToSlash(name), "/") {
		if part == ".." {
			return true
		}
	}
	return false
}

// OpenPath opens the image at path and its chain with backing files resolved
// as QEMU does (see DirOpener with allowAny). For trusted, local images only.
func OpenPath(path string, opts Options) (*Chain, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	f, err := OpenFile(abs)
	if err != nil {
		return nil, err
	}
	if opts.Open == nil {
		opts.Open = DirOpener(true)
	}
	if opts.OpenDataFile == nil && !opts.Untrusted {
		opts.OpenDataFile = DirOpener(true)
	}
	return Open(f, opts)
}
