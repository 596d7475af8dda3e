#!/usr/bin/env bash
# start.sh DIR: a private libvirtd for snapfs tests and benchmarks: root,
# monolithic (Debian 12 ships libvirt 9.0 with libvirtd), the qemu driver
# only, no systemd, no virtlogd, no cgroups, no security driver. Every file
# it writes lives under DIR; the host's /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are not used.
#
# How: libvirtd runs as root in a private mount namespace where DIR/etc,
# DIR/run, DIR/lib, DIR/log and DIR/cache are bind-mounted over those
# directories (a root libvirtd has them compiled in; only a session daemon
# takes XDG paths). The host only gains the empty directories that serve as
# mount points (what the libvirt-daemon-system package makes anyway).
# qemu runs in the same namespace, so it sees image paths exactly as
# the host does, as long as they are not under those five directories.
#
# Guests must be <domain type='qemu'> (TCG): the machines this runs on may
# have no usable KVM.
#
# The last line on stdout is LIBVIRT_URI=qemu+unix:///system?socket=...;
# DIR/env holds the same as a shell export. DIR/run/libvirtd.pid is the
# daemon's PID (the only thing stop.sh signals, with the qemu processes
# that run in the same mount namespace).
#
# DIR must be missing, empty, or a directory this script made before (it
# has DIR/.snapfs-libvirt): a daemon already running there is stopped and
# its state wiped first, except DIR/cache (the qemu capability probe, which
# takes seconds and stays valid while qemu is unchanged: libvirt checks).
#
# Environment (all optional):
#   LIBVIRT_WAIT       seconds to wait for the daemon (default 120)
#   LIBVIRT_CACHE_DIR  where the qemu capability cache lives (default
#                      DIR/cache): a directory kept between runs makes a
#                      start in a new DIR take 0.2 s instead of 8-10 s
#   LIBVIRT_OWNER_PID  a process whose end stops the daemon (a test binary
#                      that may die before it runs stop.sh: a panic, a
#                      timeout, kill -9); stop.sh ends this watchdog too
#
# Debian packages: libvirt-daemon libvirt-daemon-driver-qemu
# libvirt-clients qemu-system-x86 (util-linux gives unshare).
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[[ $# == 1 && -n $1 ]] || usage
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
WAIT=${LIBVIRT_WAIT:-120}
HERE=$(cd "$(dirname "$0")" && pwd -P)

log() { printf '[libvirt %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root: it runs a system libvirtd in a private mount namespace"
for cmd in libvirtd virsh unshare qemu-system-x86_64; do
	command -v "$cmd" >/dev/null ||
		die "$cmd not found; install the Debian packages libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86"
done
# The socket path must fit in sockaddr_un (108 bytes with the NUL).
sock=$DIR/run/libvirt-sock
((${#sock} < 100)) || die "$DIR is too long a path for a unix socket; use a shorter one"

# A DIR we did not make is never wiped: it could be anything.
if [[ -n $(ls -A "$DIR") && ! -e $DIR/.snapfs-libvirt ]]; then
	die "$DIR is not empty and was not made by $0; give an empty or new directory"
fi
if [[ -e $DIR/.snapfs-libvirt ]]; then
	"$HERE/stop.sh" "$DIR"
	rm -rf "${DIR:?}"/{etc,run,lib,log,env,passwd,group}
fi
touch "$DIR/.snapfs-libvirt"
mkdir -p "$DIR"/{etc,run,lib,log,cache}
CACHE=${LIBVIRT_CACHE_DIR:-$DIR/cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

# The qemu driver looks up the user and group libvirt-qemu, compiled in as
# the default, before it reads user = "root" from qemu.conf, and refuses to
# start without them. Rather than add a user to the host, the namespace
# sees copies of /etc/passwd and /etc/group that have it.
cp /etc/passwd "$DIR/passwd"
cp /etc/group "$DIR/group"
grep -q '^libvirt-qemu:' "$DIR/passwd" ||
	echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >>"$DIR/passwd"
grep -q '^libvirt-qemu:' "$DIR/group" || echo 'libvirt-qemu:x:64055:' >>"$DIR/group"
grep -q '^kvm:' "$DIR/group" || echo 'kvm:x:64056:' >>"$DIR/group"

# Paths below are as the daemon sees them, inside the namespace.
cat >"$DIR/etc/libvirtd.conf" <<'EOF'
# Written by snapfs scripts/libvirt/start.sh: a private test daemon.
# Root only: the socket is 0700, so no authentication (no polkit here).
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
cat >"$DIR/etc/qemu.conf" <<'EOF'
# Written by snapfs scripts/libvirt/start.sh: a private test daemon.
# qemu runs as root and libvirt changes no file's owner or label: test
# images belong to root and no security driver (AppArmor, SELinux) runs.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
# No per-VM mount namespace or private /dev: qemu must see the host's paths.
namespaces = [ ]
# systemd is not PID 1: leave cgroups alone.
cgroup_controllers = [ ]
# No virtlogd (it is socket-activated by systemd): qemu writes its log and
# the serial console files itself.
stdio_handler = "file"
EOF

# A failed start must not leave a daemon behind (in CI nobody would stop it).
trap 'rc=$?; if [[ $rc != 0 ]]; then log "start failed (logs in $DIR/log), stopping what started"; "$HERE/stop.sh" "$DIR" || true; fi' EXIT

# The mount points on the host: empty directories, never removed (another
# daemon's namespace may use them; removing a mount point would detach its
# mounts there).
mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt

t0=$(date +%s%N)
# unshare and sh exec into libvirtd: $! is the daemon. setsid and the
# redirections detach it from our terminal and from whoever reads our
# stdout (a test that waits for EOF).
setsid unshare --mount --propagation private /bin/sh -c '
	set -e
	d=$1
	# The namespace starts with a copy of every mount of the host. A copy
	# of a FUSE mount (a snapfs mount of a test running meanwhile) would
	# keep its connection alive after the host unmounts it, and its
	# daemon would wait for this libvirtd to stop: detach them, qemu
	# needs none (fuse, fuse.NAME, fuseblk; not fusectl). mountinfo
	# escapes a space in a mount point as \040, a backslash as \134.
	awk '\''{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) ~ /^fuse(blk)?([.]|$)/) print $5; break } }'\'' /proc/self/mountinfo |
		sed -e "s/\\\\040/ /g" -e "s/\\\\134/\\\\/g" |
		while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
	mount --bind "$d/passwd" /etc/passwd
	mount --bind "$d/group" /etc/group
	mount --bind "$d/etc" /etc/libvirt
	mount --bind "$d/run" /run/libvirt
	mount --bind "$d/lib" /var/lib/libvirt
	mount --bind "$d/log" /var/log/libvirt
	mount --bind "$2" /var/cache/libvirt
	exec /usr/sbin/libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid
' snapfs-libvirtd "$DIR" "$CACHE" </dev/null >"$DIR/log/libvirtd.stdout" 2>&1 &
pid=$!
echo "$pid" >"$DIR/run/libvirtd.outer.pid"

URI="qemu+unix:///system?socket=$sock"
deadline=$((SECONDS + WAIT))
until virsh -q -c "$URI" version >/dev/null 2>&1; do
	if ! kill -0 "$pid" 2>/dev/null; then
		tail -20 "$DIR/log/libvirtd.stdout" "$DIR/log/libvirtd.log" >&2 2>/dev/null || true
		die "libvirtd exited"
	fi
	((SECONDS < deadline)) || die "libvirtd did not answer on $sock within $WAIT s"
	sleep 0.05
done
# The namespace identifies our qemu processes for stop.sh.
readlink "/proc/$pid/ns/mnt" >"$DIR/run/mntns"

if [[ -n ${LIBVIRT_OWNER_PID:-} ]]; then
	[[ $LIBVIRT_OWNER_PID =~ ^[0-9]+$ ]] || die "LIBVIRT_OWNER_PID=$LIBVIRT_OWNER_PID is not a PID"
	# Detached, with no open stdout: whoever reads ours must see EOF.
	setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" "$3"' \
		snapfs-libvirt-watchdog "$LIBVIRT_OWNER_PID" "$HERE/stop.sh" "$DIR" \
		</dev/null >>"$DIR/log/watchdog.log" 2>&1 &
	echo $! >"$DIR/run/watchdog.pid"
fi
printf 'export LIBVIRT_URI=%q\n' "$URI" >"$DIR/env"
log "libvirtd (pid $pid) ready in $((($(date +%s%N) - t0) / 1000000)) ms"
echo "LIBVIRT_URI=$URI"
