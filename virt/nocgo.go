//go:build libvirt && !cgo

package virt

// The libvirt binding is cgo: with the tag "libvirt" and CGO_ENABLED=0 the
// build would fail deep inside it with undefined names. Fail here instead,
// with the fix in the message.
var _ = virt_needs_cgo__build_with_CGO_ENABLED_1
