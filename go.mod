module snapfs

go 1.26

require (
	github.com/ceph/go-ceph v0.34.0
	github.com/hanwen/go-fuse/v2 v2.9.0
	github.com/klauspost/compress v1.18.0
	github.com/spf13/cobra v1.8.1
	github.com/spf13/pflag v1.0.5
	golang.org/x/sys v0.33.0
	libvirt.org/go/libvirt v1.10009.0
)

require github.com/inconshreveable/mousetrap v1.1.0 // indirect
