//go:build ceph && !cgo

package rbdio

// go-ceph is cgo: with the tag "ceph" and CGO_ENABLED=0 the build would fail
// deep inside go-ceph with undefined names. Fail here instead, with the
// fix in the message.
var _ = rbdio_needs_cgo__build_with_CGO_ENABLED_1
