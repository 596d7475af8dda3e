module snapfs

go 1.26

require (
	github.com/hanwen/go-fuse/v2 v2.9.0 // indirect
	github.com/klauspost/compress v1.18.0 // indirect
)
