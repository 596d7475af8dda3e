#!/usr/bin/env bash
# osd.sh stop|start DIR: makes the OSD of the cluster that start.sh DIR
# started stop answering (SIGSTOP), or answer again (SIGCONT), to test what
# clients do while an OSD hangs or is unreachable. The OSD is not killed:
# its store is memstore, which loses every object when the OSD restarts.
# Like stop.sh, it signals the PID of DIR/run/osd.0.pid only while that
# process is a ceph-osd whose command line names DIR/ceph.conf.
set -euo pipefail

usage() { echo "usage: $0 stop|start DIR" >&2; exit 2; }
[[ $# == 2 && -n $2 ]] || usage
case $1 in
stop) sig=STOP ;;
start) sig=CONT ;;
*) usage ;;
esac
DIR=$(cd "$2" && pwd -P)
CONF=$DIR/ceph.conf
pf=$DIR/run/osd.0.pid
[[ -r $pf ]] || { echo "$0: $pf: no OSD started by start.sh in $DIR" >&2; exit 1; }
pid=$(<"$pf")
if ! [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] ||
	! tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$CONF"; then
	echo "$0: pid $pid of $pf is not the OSD of $CONF" >&2
	exit 1
fi
kill -"$sig" "$pid"
# kill returns once SIGSTOP is queued: the OSD stops only when each of its
# threads has taken it, and until then it still answers requests (on a
# loaded machine, the read a test sends right after). Wait for every thread
# to be stopped (T), or gone (Z, X).
if [[ $sig == STOP ]]; then
	for ((i = 0; ; i++)); do
		running=
		for f in /proc/"$pid"/task/*/stat; do
			st=$(<"$f") 2>/dev/null || continue
			st=${st##*) }
			[[ ${st:0:1} == [TZX] ]] || { running=${f#/proc/$pid/task/}; break; }
		done
		[[ -z $running ]] && break
		((i < 60000)) || { echo "$0: osd.0 (pid $pid) does not stop: thread ${running%/stat}" >&2; exit 1; }
		sleep 0.001
	done
fi
printf '[ceph %(%H:%M:%S)T] osd.0 (pid %s): SIG%s\n' -1 "$pid" "$sig" >&2
