#!/usr/bin/env bash
# build-guest.sh DIR: a tiny guest for the libvirt tests, built from Debian
# packages without root-filesystem tricks (no loop mounts, no debootstrap):
#
#   DIR/vmlinuz         Debian's cloud kernel (direct kernel boot)
#   DIR/initrd.img      busybox-static, the virtio modules and qemu-ga
#
# It boots to a ready guest agent in about 5 s under TCG with 128 MiB. The
# guest has no root disk: its root is the initramfs. Every virtio disk that
# holds ext4 is mounted at /data/vdX, and the guest writes to each of them
# continuously (a heartbeat line and a 16 KiB block, ten times a second,
# forever): a snapshot that is not quiesced catches the ext4 journal in use.
# Each round also prints "HB N" on the serial console, so a test that reads
# the console sees whether the guest is writing (a frozen filesystem stops
# the loop). qemu-ga is restarted when it exits, with its state directory
# on the initramfs, as a real init system would restart it; qemu-ga keeps
# its frozen state there (qga.state.isfrozen), so a restarted agent knows
# the filesystems are frozen and can still thaw them. With snapfs.freeze_hook
# on the kernel command line, qemu-ga runs /run/freeze-hook (if a test put
# one there) before it freezes and after it thaws.
#
# The packages are fetched with apt-get download into DIR/debs (kept, so a
# second run needs no network): linux-image-cloud-amd64's kernel package,
# busybox-static, qemu-guest-agent. qemu-ga's shared libraries come from the
# host, which must run the same Debian release (ldd finds them).
#
# The domain XML is up to the caller: type='qemu', <kernel>DIR/vmlinuz,
# <initrd>DIR/initrd.img, <cmdline>console=ttyS0, a serial console, a
# virtio-serial channel named org.qemu.guest_agent.0, and the data disks as
# virtio disks. See virt/guest_test.go.
#
# On the host: dpkg-deb, apt-get and gzip (busybox itself makes the cpio
# archive), and the package lists (apt-get update) for apt-get download.
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[[ $# == 1 && -n $1 ]] || usage
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)

log() { printf '[guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for cmd in apt-get apt-cache dpkg-deb gzip ldd; do
	command -v "$cmd" >/dev/null || die "$cmd not found"
done

DEBS=$DIR/debs
X=$DIR/extract
mkdir -p "$DEBS" "$X"

# The kernel: whatever linux-image-cloud-amd64 depends on now.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $kpkg ]] || die "cannot resolve linux-image-cloud-amd64 to a kernel package (run apt-get update)"
KVER=${kpkg#linux-image-}

# fetch PKG: the .deb of PKG in DEBS, downloaded once.
fetch() {
	local f
	f=$(ls "$DEBS/$1"_*.deb 2>/dev/null | head -1 || true)
	if [[ -z $f ]]; then
		log "downloading $1"
		(cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2) || die "apt-get download $1 failed"
		f=$(ls "$DEBS/$1"_*.deb | head -1)
	fi
	echo "$f"
}
# unpack PKG: extracts PKG's .deb into X/PKG, once.
unpack() {
	local deb
	deb=$(fetch "$1")
	if [[ ! -e $X/$1/.done ]]; then
		rm -rf "${X:?}/$1"
		dpkg-deb -x "$deb" "$X/$1"
		touch "$X/$1/.done"
	fi
}
unpack "$kpkg"
unpack busybox-static
unpack qemu-guest-agent

K=$X/$kpkg
[[ -f $K/boot/vmlinuz-$KVER ]] || die "$kpkg has no /boot/vmlinuz-$KVER"

R=$X/initramfs
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,run,tmp,data,etc}
mkdir -p "$R/var"
ln -s ../run "$R/var/run"
cp "$X/busybox-static/bin/busybox" "$R/bin/busybox"

# The virtio stack, in load order. ext4, jbd2 and crc32c are built into the
# cloud kernel; these are not.
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console"
for m in $mods; do
	f=$(find "$K/lib/modules/$KVER/kernel/drivers" -name "$m.ko" | head -1)
	[[ -n $f ]] || die "module $m.ko not found in $kpkg (compressed modules are not supported)"
	cp "$f" "$R/lib/modules/"
done

cp "$X/qemu-guest-agent/usr/sbin/qemu-ga" "$R/usr/sbin/qemu-ga"
if ldd "$R/usr/sbin/qemu-ga" | grep -q 'not found'; then
	die "qemu-ga needs libraries the host lacks: $(ldd "$R/usr/sbin/qemu-ga" | grep 'not found' | tr -s ' \t' ' ')"
fi
for lib in $(ldd "$R/usr/sbin/qemu-ga" | grep -o '/[^ ]*'); do
	mkdir -p "$R$(dirname "$lib")"
	cp -L "$lib" "$R$lib"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"
# qemu-ga's freeze hook, used only when the kernel command line has
# snapfs.freeze_hook: it runs /run/freeze-hook (freeze|thaw) if a test put
# one there (a slow or hung hook, like a database flush that takes long).
cat >"$R/etc/fsfreeze-hook" <<'HOOK'
#!/bin/sh
[ -x /run/freeze-hook ] && exec /run/freeze-hook "$@"
exit 0
HOOK
chmod +x "$R/etc/fsfreeze-hook"

cat >"$R/init" <<INIT
#!/bin/busybox sh
# PID 1 of the snapfs test guest (scripts/libvirt/build-guest.sh).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $mods; do insmod /lib/modules/\$m.ko; done
i=0; while [ ! -e /sys/class/virtio-ports ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i+1)); done
# Every ext4 virtio disk becomes /data/vdX (the others are left alone).
for b in /sys/block/vd*; do
	[ -e "\$b" ] || continue
	d=\${b##*/}
	mkdir -p /data/\$d
	if mount -t ext4 /dev/\$d /data/\$d 2>/dev/null; then echo "GUEST: mounted /dev/\$d"; else rmdir /data/\$d; fi
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
	[ -e "\$p/name" ] && ln -sf /dev/\${p##*/} /dev/virtio-ports/\$(cat \$p/name)
done
hook=
case " \$(cat /proc/cmdline) " in *" snapfs.freeze_hook "*) hook="-F/etc/fsfreeze-hook" ;; esac
echo "GUEST: starting qemu-ga up=\$(cut -d' ' -f1 /proc/uptime)"
# qemu-ga, restarted whenever it exits (a test kills it on purpose).
(
	while true; do
		/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run \$hook
		echo "GUEST: qemu-ga exited (\$?), restarting"
		sleep 0.5
	done
) &
# The writer: blocks while the filesystems are frozen.
n=0
while true; do
	n=\$((n+1))
	for d in /data/vd*; do
		[ -d "\$d" ] || continue
		echo "\$n \$(cut -d' ' -f1 /proc/uptime)" >>\$d/heartbeat
		dd if=/dev/zero of=\$d/block.\$((n % 16)) bs=16k count=1 2>/dev/null
	done
	echo "HB \$n"
	sleep 0.1
done
INIT
chmod +x "$R/init"

tmp=$DIR/.initrd.img.tmp
(cd "$R" && find . | "$R/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$tmp")
mv "$tmp" "$DIR/initrd.img"
cp "$K/boot/vmlinuz-$KVER" "$DIR/.vmlinuz.tmp"
mv "$DIR/.vmlinuz.tmp" "$DIR/vmlinuz"
log "guest ready: $DIR/vmlinuz ($KVER), $DIR/initrd.img ($(($(stat -c %s "$DIR/initrd.img") >> 10)) KiB)"
