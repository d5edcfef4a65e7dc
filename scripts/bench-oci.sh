#!/bin/sh
# Push and pull of a VM image through a local registry, vmapple against
# skopeo moving the same image (not a pass/fail test; see docs/bundles.md).
#
#   scripts/bench-oci.sh [DISK_GIB [DATA_GIB]]     default 4 and 1
#
# Makes a Tart VM whose sparse disk.img holds DATA_GIB of random data in
# four runs, starts Debian's docker-registry on a free loopback port, then
# times, each in one run on the same machine:
#   vmapple push   bundle -> registry (compress, upload)
#   vmapple pull   registry -> new bundle (download, verify, decompress,
#                  sparse disk), empty blob cache
#   skopeo copy    registry -> dir: (the same compressed blobs, no decoding)
#   skopeo copy    dir: -> registry (another repository)
# and prints the seconds, MB/s of image bytes and vmapple/skopeo ratios.
# Needs docker-registry and skopeo (scripts/setup.sh) and a built vmapple
# (cargo build --release -p vmapple, or VMAPPLE=path).
set -eu
cd "$(dirname "$0")/.."

disk_gib=${1:-4}
data_gib=${2:-1}
vmapple=${VMAPPLE:-${CARGO_TARGET_DIR:-target}/release/vmapple}
[ -x "$vmapple" ] || { echo "bench-oci: no vmapple at $vmapple (set VMAPPLE)" >&2; exit 1; }
for bin in /usr/bin/docker-registry /usr/bin/skopeo; do
    [ -x "$bin" ] || { echo "bench-oci: $bin missing (apt-get install docker-registry skopeo)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/bench-oci.XXXXXX)
registry_pids=""
cleanup() {
    for pid in $registry_pids; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

# start_registry NAME: a registry with storage of its own; sets $addr.
start_registry() {
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    addr="127.0.0.1:$port"
    mkdir -p "$work/$1"
    printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
        "$work/$1" "$addr" >"$work/$1.yml"
    /usr/bin/docker-registry serve "$work/$1.yml" >"$work/$1.log" 2>&1 &
    registry_pids="$registry_pids $!"
    i=0
    until curl -s "http://$addr/v2/" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || { echo "bench-oci: registry did not start" >&2; cat "$work/$1.log" >&2; exit 1; }
        sleep 0.1
    done
}
# skopeo pushes to a registry of its own: in the first one it would find
# every blob already there (or mount it from the other repository).
start_registry skopeo-registry
skopeo_addr=$addr
start_registry registry

# The VM: a Tart directory imported as a bundle.
tart="$work/tart"
mkdir -p "$tart"
truncate -s "${disk_gib}G" "$tart/disk.img"
run_mib=$((data_gib * 256))
for n in 0 1 2 3; do
    dd if=/dev/urandom of="$tart/disk.img" bs=1M count="$run_mib" \
        seek=$((n * disk_gib * 256)) conv=notrunc status=none
done
truncate -s 32M "$tart/nvram.bin"
# ECID 1 as a binary plist, base64.
ecid=YnBsaXN0MDDRAQJURUNJRBABCAsQAAAAAAAAAQEAAAAAAAAAAwAAAAAAAAAAAAAAAAAAABI=
printf '{"version":1,"os":"darwin","arch":"arm64","ecid":"%s","cpuCount":2,"memorySize":4294967296,"cpuCountMin":2,"memorySizeMin":4294967296,"macAddress":"7a:65:e4:3c:2b:01"}' \
    "$ecid" >"$tart/config.json"
export VMAPPLE_HOME="$work/home"
"$vmapple" import "$tart" src >/dev/null 2>&1

image_mb=$(du -sm "$tart/disk.img" | cut -f1)
echo "image: ${disk_gib} GiB disk, ${image_mb} MiB of data"

t0=$(now)
"$vmapple" push --insecure src "$addr/bench/vm:v1" >/dev/null
t1=$(now)
"$vmapple" pull --insecure "$addr/bench/vm:v1" pulled >/dev/null
t2=$(now)
cmp "$tart/disk.img" "$VMAPPLE_HOME/pulled.vmapple/root.img"
skopeo --insecure-policy copy -q --src-tls-verify=false "docker://$addr/bench/vm:v1" "dir:$work/skopeo" >/dev/null
t3=$(now)
skopeo --insecure-policy copy -q --dest-tls-verify=false "dir:$work/skopeo" "docker://$skopeo_addr/bench/vm:v1" >/dev/null
t4=$(now)

push=$(secs "$t0" "$t1")
pull=$(secs "$t1" "$t2")
spull=$(secs "$t2" "$t3")
spush=$(secs "$t3" "$t4")
blob_mb=$(du -sm "$work/skopeo" | cut -f1)
echo "compressed image: ${blob_mb} MiB"
printf 'vmapple push  %6.2f s\nvmapple pull  %6.2f s\nskopeo pull   %6.2f s (docker:// -> dir:)\nskopeo push   %6.2f s (dir: -> docker://)\n' \
    "$push" "$pull" "$spull" "$spush"
printf 'pull ratio (skopeo time / vmapple time): %.2f\npush ratio (skopeo time / vmapple time): %.2f\n' \
    "$(echo "$spull / $pull" | bc -l)" "$(echo "$spush / $push" | bc -l)"
