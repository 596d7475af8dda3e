#!/usr/bin/env bash
# stop.sh DIR: stops what start.sh DIR started, and nothing else:
#   1. the watchdog of start.sh (LIBVIRT_OWNER_PID), if it names DIR;
#   2. every running domain, through the daemon (virsh destroy): stopping
#      libvirtd alone would leave the qemu processes running;
#   3. any qemu process still alive in the daemon's mount namespace (a
#      daemon that died first leaves its guests behind), found through the
#      PID files under DIR/run/qemu and checked by namespace;
#   4. libvirtd itself: SIGTERM, then SIGKILL after 10 s.
# DIR and its logs are kept; start.sh wipes them. Safe to run again, or on
# a directory where nothing runs.
set -euo pipefail

[[ $# == 1 && -n $1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
[[ -d $1 ]] || exit 0
DIR=$(cd "$1" && pwd -P)
[[ -d $DIR/run ]] || exit 0

log() { printf '[libvirt %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

ns=""
[[ -r $DIR/run/mntns ]] && ns=$(<"$DIR/run/mntns")

# daemon PID: the process is alive and runs in the namespace start.sh made
# (a PID file left by an earlier run may name a stranger by now).
daemon_alive() {
	[[ $1 =~ ^[0-9]+$ && -e /proc/$1 ]] || return 1
	[[ -z $ns || $(readlink "/proc/$1/ns/mnt" 2>/dev/null) == "$ns" ]]
}

# The watchdog goes first, so that it cannot stop a later daemon in the
# same DIR. When the watchdog itself runs this script, its PID is our
# parent's: leave it be.
if [[ -e $DIR/run/watchdog.pid ]]; then
	pid=$(<"$DIR/run/watchdog.pid") || true
	if [[ $pid =~ ^[0-9]+$ && $pid != "$PPID" && $pid != $$ && -r /proc/$pid/cmdline ]] &&
		tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$DIR"; then
		kill -TERM "$pid" 2>/dev/null || true
	fi
	rm -f "$DIR/run/watchdog.pid"
fi

pid=""
[[ -e $DIR/run/libvirtd.outer.pid ]] && pid=$(<"$DIR/run/libvirtd.outer.pid")

URI="qemu+unix:///system?socket=$DIR/run/libvirt-sock"
if [[ -n $pid ]] && daemon_alive "$pid" && [[ -S $DIR/run/libvirt-sock ]]; then
	for d in $(timeout 30 virsh -q -c "$URI" list --name 2>/dev/null || true); do
		timeout 30 virsh -q -c "$URI" destroy "$d" >/dev/null 2>&1 && log "destroyed domain $d" || true
	done
fi

# qemu writes its PID file at /run/libvirt/qemu/NAME.pid in the namespace,
# which is DIR/run/qemu/NAME.pid here (driver.pid is libvirtd's own lock).
if [[ -n $ns ]]; then
	for f in "$DIR"/run/qemu/*.pid; do
		[[ -f $f && $(basename "$f") != driver.pid ]] || continue
		p=$(<"$f") || continue
		if [[ $p =~ ^[0-9]+$ && $(readlink "/proc/$p/ns/mnt" 2>/dev/null) == "$ns" ]]; then
			log "killing leftover qemu $p ($(basename "$f" .pid))"
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
fi

if [[ -n $pid ]] && daemon_alive "$pid"; then
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 100); do
		daemon_alive "$pid" || break
		sleep 0.1
	done
	if daemon_alive "$pid"; then
		log "libvirtd $pid still alive after 10 s: SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	log "libvirtd $pid stopped"
fi
rm -f "$DIR/run/libvirtd.outer.pid"
