#!/usr/bin/env bash
# Installs what snapfs needs to build and test, and nothing that is there
# already: Debian packages (qemu-utils for qemu-img/qemu-io, the oracles of
# the tests; fuse3 for fusermount3; gcc for the cgo backends) and the Go
# modules. Safe to run again and again: with everything present it makes no
# change and touches no network but the Go module cache check.
set -euo pipefail

# qemu-utils: qemu-img and qemu-io, the oracles of the tests; fuse3:
# fusermount3; gcc, librados-dev, librbd-dev: the Ceph backend (cgo);
# ceph-mon, ceph-osd, ceph-mgr, ceph-common: the one-node test cluster of
# scripts/ceph/start.sh; rbd-fuse: its peer in the benchmarks; rsync: tests;
# pkg-config, libvirt-dev: the libvirt provider (cgo); libvirt-daemon,
# libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86: the private
# libvirtd of scripts/libvirt/start.sh and its TCG guests; e2fsprogs:
# mkfs.ext4 and dumpe2fs for the guests' data disks; qemu-block-extra:
# qemu's rbd block driver, for a guest with an RBD disk (only a Recommends
# of qemu-system-x86); python3: tests that need a process which execs itself
# or holds memory (Go cannot do either on its own).
packages=(qemu-utils fuse3 gcc rsync librados-dev librbd-dev ceph-mon ceph-osd ceph-mgr ceph-common rbd-fuse
	pkg-config libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 e2fsprogs
	qemu-block-extra python3)

missing=()
for p in "${packages[@]}"; do
	# dpkg-query says "install ok installed" only for a fully installed
	# package; a removed one ("deinstall ok config-files") counts as missing.
	if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} > 0)); then
	echo "deps: installing ${missing[*]}" >&2
	sudo=()
	if [[ $(id -u) != 0 ]]; then
		if ! command -v sudo >/dev/null; then
			echo "deps: missing Debian packages ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
			exit 1
		fi
		sudo=(sudo)
	fi
	# No stdin in CI: never let apt or debconf ask a question.
	export DEBIAN_FRONTEND=noninteractive
	"${sudo[@]}" apt-get update -q
	"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

# scripts/libvirt/build-guest.sh fetches the test guest's kernel, busybox
# and qemu-ga with apt-get download, which needs the package lists: a
# machine whose packages were all preinstalled may have none.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
	echo "deps: fetching the package lists (for the test guest's packages)" >&2
	if [[ $(id -u) == 0 ]]; then
		DEBIAN_FRONTEND=noninteractive apt-get update -q
	else
		sudo apt-get update -q
	fi
fi

go mod download
