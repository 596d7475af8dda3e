#!/usr/bin/env bash
# The issue-3 benchmarks through a real FUSE mount, against qemu-img doing the
# same work on the same files, in one run:
#
#   1. cat disk.raw of a dense 8-layer chain vs qemu-img convert -O raw
#   2. read throughput of a chain 1 deep vs 64 deep (target ratio >= 0.9)
#   3. mkdir snapshot latency on a 1 GiB and a 100 GiB volume (p50 < 20 ms)
#   4. cp of a qcow2 into import/ vs qemu-img convert -O qcow2
#
# Usage: bench/mount.sh [WORKDIR]   (default .bench/mount)
# Env:   SIZE (default 2G) for 1 and 4, DEPTH_SIZE (default 512M) for 2,
#        SNAPFS (default bin/snapfs).
#
# Every image is built before mounting: qemu-io writes the volume heads
# directly, which a mount would hold busy.
set -euo pipefail

work=${1:-.bench/mount}
size=${SIZE:-2G}
depth_size=${DEPTH_SIZE:-512M}
snapfs=${SNAPFS:-bin/snapfs}

mkdir -p "$work"
work=$(cd "$work" && pwd)
snapfs=$(cd "$(dirname "$snapfs")" && pwd)/$(basename "$snapfs")
store=$work/store
mnt=$work/mnt
mount_pid=

# bytes converts a qemu-img size (512M, 2G) to bytes.
bytes() {
	local n=${1%[kKmMgGtT]} unit=${1##*[0-9]}
	case $unit in
	k | K) echo $((n << 10)) ;;
	m | M) echo $((n << 20)) ;;
	g | G) echo $((n << 30)) ;;
	t | T) echo $((n << 40)) ;;
	*) echo "$n" ;;
	esac
}

# cleanup runs on every exit: never leave a mount or gigabytes behind. Only
# the paths this script makes are removed, so WORKDIR may be anything.
cleanup() {
	set +e
	if [ -n "$mount_pid" ]; then
		fusermount3 -u "$mnt" 2>/dev/null
		kill "$mount_pid" 2>/dev/null
		wait "$mount_pid" 2>/dev/null
	fi
	mountpoint -q "$mnt" 2>/dev/null && fusermount3 -uz "$mnt"
	rm -rf "$store" "$work"/*.qcow2 "$work"/*.raw "$work/mount.log"
	rmdir "$mnt" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}

now() { date +%s%N; }

sf() { "$snapfs" "$@" --store "$store"; }

# snap_path VOL SNAP prints the layer file of snapshot VOL@SNAP.
snap_path() {
	sf snapshot list --json "$1" | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    if s["name"] == sys.argv[1]:
        print(s["path"])' "$2"
}

head_path() {
	sf volume list --json | python3 -c '
import json, sys
for v in json.load(sys.stdin):
    if v["name"] == sys.argv[1]:
        print(v["head_path"])' "$1"
}

# new_volume NAME SIZE imports an empty qcow2 of SIZE as NAME.
new_volume() {
	qemu-img create -q -f qcow2 "$work/empty.qcow2" "$2"
	sf volume import "$work/empty.qcow2" "$1" >/dev/null
	rm -f "$work/empty.qcow2"
}

rows=()
# row NAME OURS_NS PEER_NS BYTES [RATIO]: times in s, MiB/s, ours/peer
# (throughput ratio, so > 1 means faster than the peer).
row() {
	rows+=("$(awk -v n="$1" -v a="$2" -v b="$3" -v by="$4" 'BEGIN {
		ta = a / 1e9; tb = b / 1e9; mib = by / 1048576
		printf "%-34s %9.2f %9.1f %9.2f %9.1f %7.2f", n, ta, mib / ta, tb, mib / tb, tb / ta
	}')")
}

total=$(bytes "$size")
dtotal=$(bytes "$depth_size")
rm -rf "$store"
mkdir -p "$store" "$mnt"
echo "mount bench: SIZE=$size DEPTH_SIZE=$depth_size in $work" >&2

# --- 1. dense chain of 8 layers --------------------------------------------
echo "building the 8-layer chain ($size)" >&2
new_volume chain8 "$total"
part=$((total / 8))
overlap=$((part / 16))
for i in $(seq 0 7); do
	off=$((i * part))
	len=$((part + overlap))
	[ $((off + len)) -gt "$total" ] && len=$((total - off))
	qemu-io -f qcow2 -c "write -P $((i + 1)) $off $len" "$(head_path chain8)" >/dev/null
	sf snapshot create chain8 "s$((i + 1))" >/dev/null
done
chain8_top=$(snap_path chain8 s8)

# --- 2. chains 1 and 64 deep -------------------------------------------------
echo "building chains 1 and 64 deep ($depth_size)" >&2
new_volume depth1 "$dtotal"
qemu-io -f qcow2 -c "write -P 7 0 $dtotal" "$(head_path depth1)" >/dev/null
sf snapshot create depth1 s >/dev/null
# Depth 64: 1 MiB stripe j lives in layer j mod 64, so a read crosses every
# layer again and again instead of walking them in 64 runs.
new_volume depth64 "$dtotal"
stripe=$((1 << 20))
nstripes=$((dtotal / stripe))
for l in $(seq 0 63); do
	cmds=()
	for ((j = l; j < nstripes; j += 64)); do
		cmds+=(-c "write -P $((l + 1)) $((j * stripe)) $stripe")
	done
	qemu-io -f qcow2 "${cmds[@]}" "$(head_path depth64)" >/dev/null
	sf snapshot create depth64 "s$l" >/dev/null
done

# --- 3. a small and a huge sparse volume -------------------------------------
for v in small:1G big:100G; do
	name=${v%%:*}
	new_volume "$name" "${v#*:}"
	qemu-io -f qcow2 -c "write -P 9 0 4M" -c "write -P 10 512M 2M" "$(head_path "$name")" >/dev/null
done

# --- 4. a dense qcow2 to import ----------------------------------------------
echo "building the $size qcow2 to import" >&2
qemu-img create -q -f qcow2 "$work/import.qcow2" "$total"
chunk=$((64 << 20))
cmds=()
for ((off = 0, p = 1; off < total; off += chunk, p++)); do
	cmds+=(-c "write -P $((p % 255 + 1)) $off $chunk")
done
qemu-io -f qcow2 "${cmds[@]}" "$work/import.qcow2" >/dev/null

# --- mount --------------------------------------------------------------------
"$snapfs" mount --store "$store" "$mnt" >"$work/mount.log" 2>&1 &
mount_pid=$!
for _ in $(seq 100); do
	mountpoint -q "$mnt" && break
	kill -0 "$mount_pid" 2>/dev/null || { cat "$work/mount.log" >&2; exit 1; }
	sleep 0.1
done
mountpoint -q "$mnt" || { echo "mount did not come up" >&2; exit 1; }

# 1. cat vs qemu-img convert -O raw, both cold.
echo "1: cat disk.raw vs qemu-img convert -O raw" >&2
drop_caches
t0=$(now)
cat "$mnt/volumes/chain8/snapshots/s8/disk.raw" >/dev/null
ours=$(($(now) - t0))
drop_caches
t0=$(now)
qemu-img convert -O raw "$chain8_top" "$work/chain8.raw"
peer=$(($(now) - t0))
rm -f "$work/chain8.raw"
row "cat disk.raw 8 layers vs qemu-img" "$ours" "$peer" "$total"

# 2. warm reads, depth 64 against depth 1.
echo "2: read depth 1 vs depth 64" >&2
# warm_read and cold_read print the best of 3 reads, in ns: a warm read of
# DEPTH_SIZE takes a tenth of a second, where one run is mostly noise.
warm_read() {
	local f=$mnt/volumes/$1/snapshots/$2/disk.raw t0 t best=
	cat "$f" >/dev/null
	for _ in 1 2 3; do
		t0=$(now)
		cat "$f" >/dev/null
		t=$(($(now) - t0))
		[ -z "$best" ] || [ "$t" -lt "$best" ] && best=$t
	done
	echo "$best"
}
cold_read() {
	local t0 t best=
	for _ in 1 2 3; do
		drop_caches
		t0=$(now)
		cat "$mnt/volumes/$1/snapshots/$2/disk.raw" >/dev/null
		t=$(($(now) - t0))
		[ -z "$best" ] || [ "$t" -lt "$best" ] && best=$t
	done
	echo "$best"
}
d1=$(warm_read depth1 s)
d64=$(warm_read depth64 s63)
row "read depth64 vs depth1, warm" "$d64" "$d1" "$dtotal"
# Warm reads may come from the kernel's page cache; cold ones go through
# snapfs and the layer files every time.
d1=$(cold_read depth1 s)
d64=$(cold_read depth64 s63)
row "read depth64 vs depth1, cold" "$d64" "$d1" "$dtotal"

# 3. mkdir latency: 20 snapshots on each volume.
echo "3: mkdir snapshot latency" >&2
mkdir_lat() {
	local i t0
	for i in $(seq 20); do
		t0=$(now)
		mkdir "$mnt/volumes/$1/snapshots/m$i"
		echo $((($(now) - t0) / 1000))
	done | sort -n | awk '{ v[NR] = $1 } END { printf "%.2f %.2f", v[int(NR * 0.5 + 0.5)] / 1000, v[int(NR * 0.9 + 0.5)] / 1000 }'
}
read -r s50 s90 <<<"$(mkdir_lat small)"
read -r b50 b90 <<<"$(mkdir_lat big)"

# 4. cp into import/ vs qemu-img convert -O qcow2, both cold.
echo "4: cp into import/ vs qemu-img convert -O qcow2" >&2
drop_caches
t0=$(now)
cp "$work/import.qcow2" "$mnt/import/imported"
ours=$(($(now) - t0))
[ -d "$mnt/volumes/imported" ] || { echo "import did not make volume imported" >&2; exit 1; }
drop_caches
t0=$(now)
qemu-img convert -O qcow2 "$work/import.qcow2" "$work/converted.qcow2"
peer=$(($(now) - t0))
row "cp import/ vs qemu-img convert" "$ours" "$peer" "$total"
# The import fsyncs the layer it writes before close(2) returns; qemu-img
# leaves its output in the page cache. This row adds the fsync to qemu-img.
rm -f "$work/converted.qcow2"
drop_caches
t0=$(now)
qemu-img convert -O qcow2 "$work/import.qcow2" "$work/converted.qcow2"
sync "$work/converted.qcow2"
peer=$(($(now) - t0))
rm -f "$work/converted.qcow2"
row "cp import/ vs qemu-img convert+sync" "$ours" "$peer" "$total"

printf '\n%-34s %9s %9s %9s %9s %7s\n' "benchmark (SIZE=$size)" "ours s" "MiB/s" "peer s" "MiB/s" "ratio"
printf '%s\n' "${rows[@]}"
printf '%-34s %9s %9s %9s %9s %7s\n' "mkdir latency ms" "1G p50" "1G p90" "100G p50" "100G p90" "ratio"
awk -v a="$s50" -v b="$s90" -v c="$b50" -v d="$b90" 'BEGIN {
	printf "%-34s %9.2f %9.2f %9.2f %9.2f %7.2f\n", "20 mkdirs per volume", a, b, c, d, c / a
}'
echo "ratio: peer time / our time (>= 1: at least the peer's speed); depth row: peer is depth 1 (target >= 0.9);" \
	"mkdir: p50 100G / p50 1G (target ~1, p50 < 20 ms)"
