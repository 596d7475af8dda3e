#!/usr/bin/env bash
# The demo behind `make run`: makes a small two-layer qcow2 chain with
# qemu-img and qemu-io under WORKDIR, then shows `snapfs info` on it and
# flattens it with `snapfs convert`, checking each result with qemu-img.
#
# Usage: scripts/demo.sh SNAPFS_BINARY WORKDIR
set -euo pipefail

snapfs=$(realpath "$1")
work=$2
mkdir -p "$work"
cd "$work"
rm -f base.qcow2 top.qcow2 flat.raw flat.qcow2

# Show each command before running it, as a newcomer would type it.
show() {
	echo "\$ $*"
	"$@"
	echo
}
quiet() { "$@" >/dev/null; }

# A 256 MiB base with data at the start, and an overlay that rewrites part
# of it and zeroes another part: a chain like the ones libvirt snapshots make.
quiet qemu-img create -f qcow2 base.qcow2 256M
quiet qemu-io -c 'write -P 0xaa 0 32M' -c 'write -P 0xbb 128M 16M' base.qcow2
quiet qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
quiet qemu-io -c 'write -P 0xcc 16M 8M' -c 'write -z 128M 4M' top.qcow2

show "$snapfs" info top.qcow2
show "$snapfs" convert -O raw top.qcow2 flat.raw
show du -h --apparent-size flat.raw
show du -h flat.raw
show qemu-img compare top.qcow2 flat.raw
show "$snapfs" convert -O qcow2 -c zstd top.qcow2 flat.qcow2
show qemu-img check flat.qcow2
show qemu-img compare top.qcow2 flat.qcow2
show "$snapfs" info --json flat.qcow2
echo "The images are in $(pwd). `make run` mounts a store; this demo shows the engine alone."
