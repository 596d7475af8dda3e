#!/usr/bin/env bash
# The command behind `make run`: mounts the default store (the embedded local
# store of qcow2 chains) at MOUNTPOINT in the foreground. On first use, when
# the store holds no volume yet, it imports a small demo volume so that there
# is something to look at. Ctrl-C unmounts.
#
# Usage: scripts/run.sh SNAPFS_BINARY MOUNTPOINT
set -euo pipefail

snapfs=$(realpath "$1")
mnt=$2

if [[ "$("$snapfs" volume list --json)" == "[]" ]]; then
	demo=$(mktemp -d)
	trap 'rm -rf "$demo"' EXIT
	# 1 GiB virtual, a few MiB of data: a sparse disk like a fresh VM's.
	qemu-img create -q -f qcow2 "$demo/demo.qcow2" 1G
	qemu-io -c 'write -P 0xaa 0 4M' -c 'write -P 0xbb 512M 2M' "$demo/demo.qcow2" >/dev/null
	"$snapfs" volume import "$demo/demo.qcow2" demo
	"$snapfs" snapshot create demo first >/dev/null
	echo "run: imported a demo volume 'demo' with one snapshot 'first'"
fi

mkdir -p "$mnt"
echo "run: mounting the store at $mnt; in another shell: ls $mnt/volumes/demo/snapshots; Ctrl-C here unmounts"
exec "$snapfs" mount "$mnt"
