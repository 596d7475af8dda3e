#!/bin/sh
# make-seeds.sh: makes the small qcow2 images that seed the fuzz targets
# (qcow/fuzz_test.go) and that TestSeedsMatchQemu reads against qemu-img.
# Run it from anywhere; it rewrites qcow/testdata/seeds/. The images are
# committed: regenerate them only to add a feature, and keep each small
# (512-byte clusters where the feature allows), because the fuzzer mutates
# every byte of them.
set -eu
cd "$(dirname "$0")/seeds"
rm -f ./*.qcow2 ./*.raw
create() { qemu-img create -q -f qcow2 "$@"; }
io() { img=$1; shift; for c in "$@"; do set -- "$@" -c "$c"; shift; done; qemu-io "$@" "$img" >/dev/null; }
pattern() { # pattern FILE SIZE: bytes that are neither constant nor random
	awk -v n="$2" 'BEGIN { for (i = 0; i < n; i++) printf "%c", 97 + (i * 7 + int(i / 13)) % 26 }' > "$1"
}

pattern text.raw 8192

# Version 3 and version 2, data, zero clusters, discarded clusters, across
# L2 tables (a 512-byte cluster's table maps 32 KiB).
create -o cluster_size=512 v3.qcow2 80k
io v3.qcow2 "write -s text.raw 1000 3000" "write -z 8k 1k" "write -P 5 40k 512" "discard 1536 512" "write -P 6 79k 1k"
create -o cluster_size=512,compat=0.10 v2.qcow2 80k
io v2.qcow2 "write -s text.raw 1000 3000" "write -z 8k 1k" "write -P 5 40k 512" "write -P 6 79k 1k"

# Compressed clusters, both types.
create -o cluster_size=512,compression_type=zlib zlib.qcow2 16k
io zlib.qcow2 "write -c -s text.raw 0 4k" "write -P 1 8k 512"
create -o cluster_size=512,compression_type=zstd zstd.qcow2 16k
io zstd.qcow2 "write -c -s text.raw 0 4k" "write -P 1 8k 512"

# Extended L2 entries (clusters of 16 KiB at least): subclusters of 512 B.
create -o cluster_size=16k,extended_l2=on extl2.qcow2 48k
io extl2.qcow2 "write -s text.raw 512 1000" "write -z 4k 1k" "write -c -s text.raw 16k 16k" "write -P 3 33k 512"

# Refcount widths at both ends, an internal snapshot, and a dirty image.
create -o cluster_size=512,refcount_bits=1 refcount1.qcow2 8k
io refcount1.qcow2 "write -P 1 0 1k"
create -o cluster_size=512,refcount_bits=64 refcount64.qcow2 8k
io refcount64.qcow2 "write -P 1 0 1k"
create -o cluster_size=512 snapshot.qcow2 8k
io snapshot.qcow2 "write -P 1 0 2k"
qemu-img snapshot -c first snapshot.qcow2
io snapshot.qcow2 "write -P 2 1k 2k"
create -o cluster_size=512,lazy_refcounts=on dirty.qcow2 8k
qemu-io -c "write -P 1 0 2k" -c "sigraise 9" dirty.qcow2 >/dev/null 2>&1 || true

rm -f text.raw
ls -l
