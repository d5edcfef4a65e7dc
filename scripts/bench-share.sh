#!/bin/sh
# Benchmarks vmapple's virtio-fs against QEMU's virtio-9p (-virtfs local,
# security_model=none) on the same host directory, and vmapple's
# virtio-vsock, in the same Linux guest (guest/out/linux, with the
# vmapple-fs and vmapple-vsock programs of guest/linux/build.sh), both on
# the software CPU (TCG). Not a test: it prints figures and ratios.
#
#   scripts/bench-share.sh [VMAPPLE_BINARY]
#
# Defaults: the binary from `cargo build --release` (target/release/vmapple,
# or $CARGO_TARGET_DIR/release/vmapple). Needs qemu-system-aarch64.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
guest=${VMAPPLE_GUEST_DIR:-$here/guest/out/linux}
vmapple=${1:-${CARGO_TARGET_DIR:-$here/target}/release/vmapple}
[ -x "$vmapple" ] || { echo "bench-share: no $vmapple (cargo build --release, or give the binary)" >&2; exit 1; }
command -v qemu-system-aarch64 >/dev/null || { echo "bench-share: qemu-system-aarch64 is missing" >&2; exit 1; }
[ -f "$guest/initramfs-share.cpio.gz" ] || { echo "bench-share: run guest/linux/build.sh first" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/share"

append="console=ttyAMA0 quiet"

# vmapple: virtio-fs, then vsock with a host sink that reads everything.
rm -rf "$work/share"/*
python3 - "$work/v.sock_7000" <<'EOF' &
import socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(64)
def sink(c):
    while c.recv(1 << 20):
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=sink, args=(c,), daemon=True).start()
EOF
sink=$!
"$vmapple" run --kernel "$guest/Image" --initrd "$guest/initramfs-share.cpio.gz" \
    --append "$append vmapple.fsbench=virtiofs:bench vmapple.vsockbench=7000" \
    --cpus 2 --memory 2G --net none --accel tcg \
    --share "bench:$work/share" --vsock "$work/v.sock" </dev/null >"$work/vmapple.out" 2>&1 || true
kill "$sink" 2>/dev/null || true

# QEMU: virtio-9p on the same directory.
rm -rf "$work/share"/*
qemu-system-aarch64 -M virt -cpu max -accel tcg -smp 2 -m 2G -nographic -nodefaults \
    -serial stdio -no-reboot \
    -kernel "$guest/Image" -initrd "$guest/initramfs-share.cpio.gz" \
    -append "$append vmapple.fsbench=9p:bench" \
    -virtfs "local,path=$work/share,mount_tag=bench,security_model=none,id=bench" \
    </dev/null >"$work/qemu.out" 2>&1 || true

ours=$(grep -a 'VMAPPLE-GUEST: fsbench' "$work/vmapple.out" || true)
theirs=$(grep -a 'VMAPPLE-GUEST: fsbench' "$work/qemu.out" || true)
vsock=$(grep -a 'VMAPPLE-GUEST: vsock bench' "$work/vmapple.out" || true)
echo "vmapple virtio-fs: ${ours#*fsbench }"
echo "QEMU virtio-9p:    ${theirs#*fsbench }"
echo "vmapple vsock:     ${vsock#*vsock bench }"
if [ -n "$ours" ] && [ -n "$theirs" ]; then
    # Fields: seq-write N MiB/s seq-read N MiB/s creates N /s stats N /s
    echo "$ours $theirs" | awk '{
        n = split($0, w, " ")
        k = 0
        for (i = 1; i <= n; i++) if (w[i] ~ /^[0-9.]+$/) v[k++] = w[i]
        printf "ratios (virtio-fs / 9p): seq-write %.2fx seq-read %.2fx creates %.2fx stats %.2fx\n", v[0] / v[4], v[1] / v[5], v[2] / v[6], v[3] / v[7]
    }'
else
    echo "bench-share: a run printed no figures; see its console:" >&2
    tail -n 20 "$work/vmapple.out" "$work/qemu.out" >&2
    exit 1
fi
