//go:build !(ceph && cgo)

package main

import (
	"errors"

	"snapfs/fs"
)

// cephBuilt says that this binary lacks the Ceph RBD backend (built
// without -tags ceph, or with CGO_ENABLED=0).
const cephBuilt = false

// openCeph refuses: the flags exist in every build, so that --help is the
// same everywhere and the error says how to get Ceph support.
func openCeph(c *cephFlags, readOnly bool) ([]fs.Pool, func() error, error) {
	return nil, nil, errors.New("this snapfs was built without Ceph support: rebuild it with CGO_ENABLED=1 go build -tags ceph,pacific ./cmd/snapfs (Ceph 16; see the rbdio package for other releases)")
}
