#!/usr/bin/env bash
# stop.sh DIR: stops the cluster that start.sh DIR started, by its PID files
# only: a PID is signalled only while its process is a Ceph daemon whose
# command line names DIR/ceph.conf, so a stale PID file never kills a
# stranger. OSD first (it tells the mon it goes), mon last. SIGTERM, then
# SIGKILL after 10 s. DIR and its logs are kept; start.sh wipes them.
# Safe to run again, or on a directory where nothing runs.
set -euo pipefail

[[ $# == 1 && -n $1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
[[ -d $1 ]] || exit 0
DIR=$(cd "$1" && pwd -P)
CONF=$DIR/ceph.conf
[[ -d $DIR/run ]] || exit 0

# ours PID: the process is alive and was started with our ceph.conf.
ours() {
	[[ -r /proc/$1/cmdline ]] && tr '\0' '\n' <"/proc/$1/cmdline" | grep -qxF -- "$CONF"
}

# The watchdog of start.sh (CEPH_OWNER_PID) goes first, so that it cannot
# stop a later cluster in the same DIR. It is ours if it names DIR. When the
# watchdog itself runs this script, its PID is our parent's: leave it be.
if [[ -e $DIR/run/watchdog.pid ]]; then
	pid=$(<"$DIR/run/watchdog.pid") || true
	if [[ $pid =~ ^[0-9]+$ && $pid != "$PPID" && $pid != $$ && -r /proc/$pid/cmdline ]] &&
		tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$DIR"; then
		kill -TERM "$pid" 2>/dev/null || true
	fi
	rm -f "$DIR/run/watchdog.pid"
fi

for pf in "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid "$DIR"/run/mon.*.pid; do
	[[ -e $pf ]] || continue
	pid=$(<"$pf") || true
	if [[ $pid =~ ^[0-9]+$ ]] && ours "$pid"; then
		printf '[ceph %(%H:%M:%S)T] stopping %s (pid %s)\n' -1 "$(basename "$pf" .pid)" "$pid" >&2
		# A stopped (SIGSTOP) daemon cannot act on SIGTERM: continue it.
		kill -CONT "$pid" 2>/dev/null || true
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 100); do
			ours "$pid" || break
			sleep 0.1
		done
		if ours "$pid"; then
			printf '[ceph %(%H:%M:%S)T] pid %s still alive after 10 s: SIGKILL\n' -1 "$pid" >&2
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$pf"
done
