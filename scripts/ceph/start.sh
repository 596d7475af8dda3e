#!/usr/bin/env bash
# start.sh DIR: a throwaway single-node Ceph cluster for snapfs tests and
# benchmarks. One mon, one mgr and one OSD whose object store is memstore
# (RAM), pool size 1, every socket on 127.0.0.1, initialised RBD pools
# ("rbd", or CEPH_POOLS); ready in seconds. No systemd: the daemons fork into
# the background and write their PID files under DIR/run, which is all
# stop.sh uses; osd.sh pauses and resumes the OSD.
#
# It writes DIR/ceph.conf (clients need only that: CEPH_CONF=DIR/ceph.conf)
# with the keyring DIR/keyring (client.admin), and DIR/env to source. The
# last line on stdout is CEPH_CONF=DIR/ceph.conf.
#
# DIR must be missing, empty, or a directory this script made before (it
# has DIR/.snapfs-ceph): a cluster already running there is stopped and
# wiped first, so a second start gives a fresh cluster. Nothing else is
# ever deleted.
#
# Environment (all optional):
#   CEPH_MON_PORT     the mon's msgr2 port (v1 is +1); default: a free one
#   CEPH_STORE_BYTES  the capacity the OSD advertises (default 4 GiB; memstore
#                     uses RAM only for what is written)
#   CEPH_WAIT         seconds to wait for the cluster (default 120)
#   CEPH_POOLS        the RBD pools to create and initialise, comma-separated
#                     (default rbd)
#   CEPH_OWNER_PID    a process whose end stops the cluster (a test binary
#                     that may die before it runs stop.sh: a panic, a
#                     timeout, kill -9); stop.sh ends this watchdog too
#
# Debian packages: ceph-mon ceph-osd ceph-mgr ceph-common.
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[[ $# == 1 && -n $1 ]] || usage
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
CONF=$DIR/ceph.conf
STORE_BYTES=${CEPH_STORE_BYTES:-4294967296}
WAIT=${CEPH_WAIT:-120}
export CEPH_CONF=$CONF

log() { printf '[ceph %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for cmd in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool rbd; do
	command -v "$cmd" >/dev/null ||
		die "$cmd not found; install the Debian packages ceph-mon ceph-osd ceph-mgr ceph-common"
done

# A DIR we did not make is never wiped: it could be anything.
if [[ -n $(ls -A "$DIR") && ! -e $DIR/.snapfs-ceph ]]; then
	die "$DIR is not empty and was not made by $0; give an empty or new directory"
fi
if [[ -e $DIR/.snapfs-ceph ]]; then
	"$(dirname "$0")/stop.sh" "$DIR"
	find "$DIR" -mindepth 1 -delete
fi

# port_free PORT: nothing listens on PORT (TCP, IPv4 or IPv6). /proc rather
# than ss(8): minimal CI images lack iproute2.
port_free() {
	local hex
	hex=$(printf ':%04X ' "$1")
	! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$4 == "0A" {print $2" "}' | grep -q -- "$hex"
}

MON_PORT=${CEPH_MON_PORT:-}
if [[ -z $MON_PORT ]]; then
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 20000))
		if port_free "$p" && port_free $((p + 1)); then MON_PORT=$p; break; fi
	done
	[[ -n $MON_PORT ]] || die "no free port for the mon; set CEPH_MON_PORT"
fi
# The mgr and the OSD pick their ports in this range, away from the mon's.
BIND_MIN=$((MON_PORT + 10))
BIND_MAX=$((MON_PORT + 400))

mkdir -p "$DIR"/{run,log,crash,mon.a,mgr.x,osd.0}
touch "$DIR/.snapfs-ceph"

# A failed start must not leave daemons behind (in CI nobody would stop them).
trap 'rc=$?; if [[ $rc != 0 ]]; then log "start failed (logs in $DIR/log), stopping what started"; "$(dirname "$0")/stop.sh" "$DIR" || true; fi' EXIT

fsid=$(cat /proc/sys/kernel/random/uuid)
cat >"$CONF" <<EOF
# Written by snapfs scripts/ceph/start.sh: a throwaway test cluster.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$((MON_PORT + 1))]
# Loopback only: every daemon binds 127.0.0.1 and nothing else.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind port min = $BIND_MIN
ms bind port max = $BIND_MAX
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = \$run_dir/\$name.asok
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
# One OSD: place copies across OSDs, not hosts; one copy; no autoscaler.
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# CI disks are often full: do not turn that into HEALTH_WARN or ERR.
mon data avail warn = 1
mon data avail crit = 0
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# The mgr modules enabled at mkfs: none that opens a port (the default adds
# restful).
mgr initial modules = iostat
# The pacific default, spelled out: fast-diff makes diff-iterate cheap.
rbd default features = layering,exclusive-lock,object-map,fast-diff,deep-flatten

[mon]
mon data = $DIR/\$name
# Each OSD map change (a snapshot id, a pool) waits for the next Paxos
# proposal, 1 s apart by default: one mon proposes at once.
paxos propose interval = 0.05
pid file = $DIR/run/\$name.pid

[mgr]
mgr data = $DIR/\$name
pid file = $DIR/run/\$name.pid
mgr disabled modules = diskprediction_local restful dashboard prometheus influx

[osd]
osd data = $DIR/\$name
pid file = $DIR/run/\$name.pid
osd objectstore = memstore
memstore device bytes = $STORE_BYTES
osd memory target = 1073741824
# Fewer threads for small CI machines.
osd op num shards = 2
osd op num threads per shard = 1

[client]
# Many short-lived clients (rbd, tests): no admin socket for each.
admin socket =
log file = $DIR/log/client.log
EOF

# One keyring holds every key; mon --mkfs imports the entities and their
# caps from it, so no "ceph auth add" round trips are needed.
kr=$DIR/keyring
ceph-authtool -C "$kr" -g -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$kr" -g -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
	--cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$kr" -g -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' \
	--cap osd 'allow *' >/dev/null
ceph-authtool "$kr" -g -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' \
	--cap mds 'allow *' >/dev/null
chmod 600 "$kr"

# quiet CMD...: a daemon's pre-fork chatter goes to log/startup.log, shown
# only when it fails.
quiet() {
	"$@" 2>>"$DIR/log/startup.log" >&2 || { tail -20 "$DIR/log/startup.log" >&2; die "failed: $*"; }
}

t0=$SECONDS
monmaptool --create --fsid "$fsid" \
	--addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$((MON_PORT + 1))]" "$DIR/monmap" >/dev/null
quiet ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$kr"
quiet ceph-mon -c "$CONF" -i a
log "mon started on 127.0.0.1:$MON_PORT"
quiet ceph-mgr -c "$CONF" -i x
log "mgr started"

osd_uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(timeout "$WAIT" ceph -c "$CONF" osd new "$osd_uuid") || die "ceph osd new failed"
[[ $id == 0 ]] || die "unexpected OSD id '$id'"
quiet ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid"
quiet ceph-osd -c "$CONF" -i 0
log "osd started (memstore, $((STORE_BYTES >> 20)) MiB)"

IFS=, read -ra pools <<<"${CEPH_POOLS:-rbd}"
for pool in "${pools[@]}"; do
	[[ $pool =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "CEPH_POOLS: bad pool name '$pool'"
	quiet timeout "$WAIT" ceph -c "$CONF" osd pool create "$pool" 8 8
	# rbd pool init waits for the pool's PGs to be active: the OSD is up.
	quiet timeout "$WAIT" rbd -c "$CONF" pool init "$pool"
	log "pool $pool initialised"
done

deadline=$((SECONDS + WAIT))
until ceph -c "$CONF" mgr stat -f json 2>/dev/null | grep -q '"available": *true'; do
	((SECONDS < deadline)) || die "the mgr never became available"
	sleep 0.3
done
# A real image create and remove: clients can use rbd.
quiet timeout "$WAIT" rbd -c "$CONF" create --size 4M "${pools[0]}/.snapfs-ready-probe"
quiet timeout "$WAIT" rbd -c "$CONF" rm --no-progress "${pools[0]}/.snapfs-ready-probe"
until h=$(ceph -c "$CONF" health 2>/dev/null) && [[ $h == HEALTH_OK* || $h == HEALTH_WARN* ]]; do
	((SECONDS < deadline)) || die "cluster health: $h"
	sleep 0.3
done
if [[ -n ${CEPH_OWNER_PID:-} ]]; then
	[[ $CEPH_OWNER_PID =~ ^[0-9]+$ ]] || die "CEPH_OWNER_PID=$CEPH_OWNER_PID is not a PID"
	# Detached, with no open stdout: whoever reads ours must see EOF.
	setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" "$3"' \
		snapfs-ceph-watchdog "$CEPH_OWNER_PID" "$(cd "$(dirname "$0")" && pwd -P)/stop.sh" "$DIR" \
		</dev/null >>"$DIR/log/watchdog.log" 2>&1 &
	echo $! >"$DIR/run/watchdog.pid"
fi
printf 'export CEPH_CONF=%q\n' "$CONF" >"$DIR/env"
log "ready in $((SECONDS - t0)) s: $h"
echo "CEPH_CONF=$CONF"
